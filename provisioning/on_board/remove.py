# ARGS: {"files": [...], "dirs": [...]}. Removes what exists; folders only when empty.
import os
for p in ARGS['files']:
    try:
        os.remove(p)
    except OSError:
        pass
for d in ARGS['dirs']:
    try:
        os.rmdir(d)
    except OSError:
        pass
print('{}')
