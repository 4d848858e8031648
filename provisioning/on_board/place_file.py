# ARGS: {"part": "/x.json.part", "path": "/x.json"}. Renames the written part into place.
# Relative names from '/': MicroPython's VfsPosix mounted at '/' (the emulated board)
# fails rename() with an absolute target.
import os
os.chdir('/')
part, path = ARGS['part'].lstrip('/'), ARGS['path'].lstrip('/')
try:
    os.rename(part, path)
except OSError:
    os.remove(path)
    os.rename(part, path)
print('{}')
