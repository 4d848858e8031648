"""A full filesystem: the node keeps a reserve for its essential writes and reports it.

The test's filesystem (a host folder) never fills, so the full flash is faked here by
wrapping open(): writes fail with ENOSPC while the flash is "full", as littlefs does,
except into the room that deleting the reserve gives back.
"""

from __future__ import annotations

from citynode.testing.micropython import run_micropython_json

FAKE_FULL = """
import builtins, json, os
os.chdir(%r)
from node import fsutil
fsutil.RESERVE = "data/reserve"
real_open = builtins.open
full = [False]
def flash_open(path, mode="r"):
    if full[0] and ("w" in mode or "a" in mode) and fsutil.exists(fsutil.RESERVE):
        raise OSError(fsutil.ENOSPC)
    return real_open(path, mode)
builtins.open = flash_open
"""


def test_the_reserve_is_kept_and_given_up_for_an_essential_write(tmp_path):
    out = run_micropython_json(FAKE_FULL % str(tmp_path) + """
made = fsutil.keep_reserve()
size = os.stat(fsutil.RESERVE)[6]
full[0] = True
fsutil.write_atomic("data/seq", b"64 1\\n")      # no room: the reserve goes, the write lands
print(json.dumps([made, size, fsutil.exists(fsutil.RESERVE),
                  real_open("data/seq").read(), fsutil.keep_reserve()]))
""")
    made, size, reserve_left, written, kept_again = out
    assert made is True and size == 8192
    assert reserve_left is False and written == "64 1\n"
    assert kept_again is True           # the fake frees room once the reserve is gone


def test_without_room_and_reserve_the_write_fails_loudly(tmp_path):
    out = run_micropython_json(FAKE_FULL % str(tmp_path) + """
os.mkdir("data")
builtins.open = lambda path, mode="r": (_ for _ in ()).throw(OSError(fsutil.ENOSPC)) \\
    if "w" in mode else real_open(path, mode)
try:
    fsutil.write_atomic("data/seq", b"1 1\\n")
    print(json.dumps("written"))
except OSError as exc:
    print(json.dumps(exc.errno))
""")
    assert out == 28
