# Build the P-256 base-point table first, before the heap fragments.
try:
    from node import p256
    p256.precompute()
except ImportError:
    pass
print('{}')
