# ARGS: {"paths": [...]}. Prints {path: sha256 hex or null}; after file_hash.py.
print(json.dumps({p: _h(p) for p in ARGS['paths']}))
