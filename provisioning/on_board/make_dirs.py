# ARGS: {"dir": "/a/b"}. Creates the folder and its parents.
import os
p = ''
for part in ARGS['dir'].strip('/').split('/'):
    p += '/' + part
    try:
        os.mkdir(p)
    except OSError:
        pass
print('{}')
