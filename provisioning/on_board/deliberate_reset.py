# A technician's reset is no crash: clear the crash count, plan the reset (node/safemode.py).
try:
    from node import safemode
    safemode.mark_healthy()
    safemode.plan('technician')
except ImportError:
    pass
print('{}')
