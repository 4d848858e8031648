# What the board is: MicroPython version, .mpy ABI, MAC, config and provisioning state.
import sys, os, json, binascii
r = {'micropython': list(sys.implementation.version[:3]),
     'mpy': getattr(sys.implementation, '_mpy', 0), 'platform': sys.platform}
try:
    import machine
    r['mac'] = binascii.hexlify(machine.unique_id()).decode()
except Exception as e:
    r['mac_error'] = str(e)
try:
    r['machine'] = os.uname().machine
except Exception:
    pass
for name, key in (('/config.json', 'config'), ('/provisioned.json', 'provisioned')):
    try:
        with open(name) as f:
            r[key] = json.load(f)
    except Exception:
        r[key] = None
if r['config']:
    r['config'] = {k: r['config'].get(k) for k in ('device', 'site', 'pole', 'lat', 'lon', 'alg')}
try:
    with open('/image.json') as f:
        r['image'] = json.load(f)
except Exception:
    r['image'] = None
try:
    from node import version
    r['firmware'] = version.VERSION
except Exception:
    r['firmware'] = None
try:
    import vfs
    r['romfs'] = hasattr(vfs, 'rom_ioctl') and vfs.rom_ioctl(1) > 0
except Exception:
    r['romfs'] = False
print(json.dumps(r))
