# A technician's reset is no crash: clear the crash-reboot count (node/safemode.py).
try:
    from node import safemode
    safemode.mark_healthy()
except ImportError:
    pass
print('{}')
