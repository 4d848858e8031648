# The MicroPython "firmware" of an emulated ESP32: installs the board modules
# (machine, network, esp32, ...) in front of the unix port's built-ins, mounts
# the board's filesystem as /, runs boot.py and main.py, then serves the REPL
# (friendly, raw and raw-paste) on stdin/stdout, which the host wires to the
# board's UART. A soft reset ends this process with an exit code; the host
# starts a fresh VM, which is what a soft reset does to the heap on the chip.
import sys
import os
import _thread
import emu_link
from emu_time import _real as _host_time
emu_link.driver_begin()     # the board's set-up, to the end of main()'s: see SET_UP_NS

EXIT_SOFT = 80      # soft reset, back to the friendly REPL (main.py runs)
EXIT_SOFT_RAW = 81  # soft reset from the raw REPL (main.py is skipped)
EXIT_RESUME = 83    # + step: this VM cannot go on; a fresh one carries on at `step`

# Where the board is once some user code has returned: the step a fresh VM resumes
# at (CITYNODE_EMU_BOOT=resume<step>) when this one has to hand over (run_user_code).
AFTER_BOOT_PY, AFTER_BOOT_PY_RAW, AFTER_MAIN_PY, IN_REPL, IN_RAW_REPL = range(5)

CTRL_A, CTRL_B, CTRL_C, CTRL_D, CTRL_E = 1, 2, 3, 4, 5
RAW_PASTE_WINDOW = 128

_out = sys.stdout
_in = sys.stdin.buffer
_globals = {"__name__": "__main__"}
# Made now, while the heap works: raising one later allocates nothing.
_RESUME = tuple(SystemExit(EXIT_RESUME + step) for step in range(IN_RAW_REPL + 1))
_sound = [True]


def write(s):
    _out.write(s)


def _install_board_modules():
    import emu_machine, emu_network, emu_esp32, emu_socket, emu_time, emu_micropython, emu_os
    import emu_vfs, emu_lfs
    emu_lfs.install()   # files written at the flash's pace (chip speed)
    for name, mod in (("machine", emu_machine), ("network", emu_network), ("esp32", emu_esp32),
                      ("socket", emu_socket), ("time", emu_time), ("os", emu_os),
                      ("micropython", emu_micropython), ("vfs", emu_vfs)):
        sys.modules[name] = mod
    sys.modules["usocket"] = emu_socket
    sys.modules["utime"] = emu_time
    _import_hook()


def _import_hook():
    """builtins.__import__, for two things the chip does that the unix port does not:

    - asyncio (frozen in the unix port) takes its clock from `time` when it is first
      imported, and its C task queue stamps tasks with the unix port's own ticks: both
      must be the same clock, so asyncio is imported with the built-in `time` in place.
      User code keeps the board's ticks (since the reset, 2**30 wrap), asyncio only ever
      measures intervals with its own.
    - Code in the heap. A module loaded from a .mpy file on the board's filesystem (a
      stock image has no ROMFS) holds its bytecode and strings in the GC heap, the same
      bytes as on the chip; the VM's heap is twice the chip's (for 64-bit objects), so
      each such module gets a ballast of its file's size and its code counts in full.
      Modules run in place from ROMFS (/rom) get none; a module dropped from
      sys.modules loses its ballast at the next import.
    """
    import builtins
    builtin_import = builtins.__import__
    ballast = {}
    board_side = os.getenv("CITYNODE_EMU_BOARD_SIDE")     # the emulator's own: no ballast
    modules = [len(sys.modules)]
    asyncio_loaded = [False]

    def load_asyncio():
        import emu_time
        board_time = sys.modules["time"]
        sys.modules["time"] = emu_time._real
        try:
            builtin_import("asyncio")
        finally:
            sys.modules["time"] = board_time

    def weigh():
        for name in list(ballast):
            if sys.modules.get(name) is not ballast[name][0]:
                del ballast[name]
        for name, mod in sys.modules.items():
            if name in ballast:
                continue
            path = getattr(mod, "__file__", None)
            if (path and path.endswith(".mpy") and not path.startswith("/rom")
                    and not path.startswith(board_side)):
                ballast[name] = (mod, bytearray(os.stat(path)[6]))

    def hook(name, globals=None, locals=None, fromlist=(), level=0):
        if not asyncio_loaded[0] and level == 0 and (
                name == "asyncio" or name.startswith("asyncio.") or name == "uasyncio"):
            asyncio_loaded[0] = True
            load_asyncio()
        module = builtin_import(name, globals, locals, fromlist, level)
        if len(sys.modules) != modules[0]:      # loaded or dropped since the last import
            weigh()
            modules[0] = len(sys.modules)
        return module

    builtins.__import__ = hook


def _mount_board_fs():
    os.umount("/")
    os.mount(os.VfsPosix(os.getenv("CITYNODE_EMU_FS")), "/")
    os.chdir("/")
    sys.path[:] = ["", ".frozen", "/lib"]
    if os.getenv("CITYNODE_EMU_ROMFS"):
        # as the ESP32 port does at boot: a valid ROMFS image is mounted at /rom
        import emu_vfs
        image = emu_vfs.load_image()
        if image is not None:
            os.mount(emu_vfs.VfsRom(image), "/rom")
            sys.path[:] = ["", ".frozen", "/rom", "/rom/lib", "/lib"]


def banner():
    return "MicroPython %s; %s\r\nType \"help()\" for more information.\r\n" % (
        os.getenv("CITYNODE_EMU_VERSION"), os.getenv("CITYNODE_EMU_MACHINE"))


def _running(flag):
    return emu_link.call(emu_link.STATE, 1 if flag else 0)


def _heap_locked():
    # Once user code has ended a 16-byte block is always free, unless the heap is locked.
    try:
        bytearray(16)
    except MemoryError:
        return True
    return False


def _report(e, before="", after=""):
    """Print e's traceback between `before` and `after` (the raw REPL's \\x04 marks).
    A heap left locked, or a Ctrl-C while the host still counts the code as running
    (see run_user_code), may cut the traceback short, not the REPL."""
    try:
        write(before)
        sys.print_exception(e, _out)
    except BaseException:
        pass
    try:
        write(after)
    except BaseException:
        pass


def _stopped():
    """User code has ended: tell the host, so that Ctrl-C no longer raises. False if
    this VM cannot go on.

    The unix port raises KeyboardInterrupt straight from its SIGINT handler, wherever
    the VM is (MICROPY_ASYNC_KBD_INTR). Two places in its C never recover: a garbage
    collection (the heap stays locked, "memory allocation failed, heap is locked", its
    marks half set) and the interning of a name (compiling, importing, getattr by
    name: the table's mutex stays held, and the next name interned waits forever)."""
    while True:
        try:
            if _heap_locked():
                return False
            interrupted = _running(False) == b"\x01"   # a Ctrl-C was sent into the code
            break
        except KeyboardInterrupt:
            pass  # another Ctrl-C before the host heard that user code had ended
    return not (interrupted and _names_locked())


class _NameProbe:
    pass


# Made at run time, so a str of the heap, which every setattr interns anew (the first
# one adds it to the table): the look takes the table's mutex and allocates nothing.
_PROBE = "name " + "probe"
_name_probe = _NameProbe()
setattr(_name_probe, _PROBE, False)


def _probe_names(done):
    setattr(_name_probe, _PROBE, True)
    done[0] = True


def _names_locked():
    """Whether the table of interned names is locked (see _stopped). Only another
    thread can look without waiting forever (Ctrl-C never lands in it: the host sends
    it to the main thread); its time is the emulator's, not the chip's. It allocates
    nothing: a Ctrl-C inside an allocation leaves the heap's (recursive) mutex held
    by the main thread, which harms nothing while that thread is the only one."""
    done = [False]
    emu_link.driver_begin()
    try:
        _thread.start_new_thread(_probe_names, (done,))
        started = _host_time.ticks_ms()
        while not done[0] and _host_time.ticks_diff(_host_time.ticks_ms(), started) < 200:
            _host_time.sleep_ms(1)
    except MemoryError:
        return False    # no room for a thread, nor for much else: the REPL will say so
    finally:
        emu_link.driver_end(0)
    return not done[0]


def _run(fn, args):
    """Run user code: what it raised, or None; _sound[0]: whether this VM can go on
    (a list made before: the heap may be locked now, and a tuple would need it).

    A Ctrl-C can land in this function's own code as the user's ends (the unix port
    raises it wherever the VM is, not only in the user's bytecode): the inner handler
    or the call to _stopped. The outer handler takes it as the chip's pyexec takes a
    Ctrl-C pending when the code ends: dropped after an error, raised after success.
    A second one cannot land in the outer handler: the host sends Ctrl-Cs at least
    emulator.vm.CTRL_C_BURST_S apart."""
    error = None
    try:
        try:
            _running(True)
            fn(*args)
        except BaseException as e:  # SystemExit too: raised again by run_user_code
            error = e
        _sound[0] = _stopped()
    except KeyboardInterrupt as e:
        error = error or e
        _sound[0] = _stopped()
    return error


def run_user_code(step, fn, *args, ok="", before="", after=""):
    """Run boot.py, main.py or REPL input and say how it ended (`ok`, or its error's
    traceback between `before` and `after`); a soft reset request propagates. `step`:
    where the board is once it returns. If this VM cannot go on (see _stopped), it
    exits and a fresh one carries on at `step`, as the chip (whose Ctrl-C waits for the
    next bytecode) would have; the REPL's globals are what is lost."""
    error = _run(fn, args)
    if isinstance(error, SystemExit):
        raise error
    if error is None:
        write(ok)
    else:
        _report(error, before, after)
    if not _sound[0]:
        raise _RESUME[step]


def _exec_file(name, step):
    try:
        os.stat(name)
    except OSError:
        return
    with open(name) as f:
        src = f.read()
    run_user_code(step, exec, compile(src, name, "exec"), _globals)


EXIT_HOST_GONE = 82  # the UART pipe closed: citynode-emu is gone, so is this board


def _read_byte():
    while True:
        try:
            b = _in.read(1)
        except KeyboardInterrupt:
            return CTRL_C
        if b:
            return b[0]
        sys.exit(EXIT_HOST_GONE)


# --- raw REPL -----------------------------------------------------------------

def _raw_paste():
    write("R\x01")
    _out.buffer.write(bytes((RAW_PASTE_WINDOW & 0xFF, RAW_PASTE_WINDOW >> 8)))
    buf = bytearray()
    remain = RAW_PASTE_WINDOW
    while True:
        c = _read_byte()
        if c == CTRL_C:
            return None
        if c == CTRL_D:
            write("\x04")
            return bytes(buf)
        buf.append(c)
        remain -= 1
        if remain == 0:
            _out.buffer.write(b"\x01")
            remain = RAW_PASTE_WINDOW


def _raw_exec(src, acknowledged):
    if not acknowledged:
        write("OK")
    try:
        code = compile(src, "<stdin>", "exec")
    except BaseException as e:
        write("\x04")
        sys.print_exception(e, _out)
        write("\x04")
        return
    run_user_code(IN_RAW_REPL, exec, code, _globals, ok="\x04\x04", before="\x04", after="\x04")


def raw_repl(header=True):
    """Returns when the user leaves with Ctrl-B; soft reset exits the process."""
    if header:
        write("raw REPL; CTRL-B to exit\r\n")
    while True:
        write(">")
        buf = bytearray()
        while True:
            c = _read_byte()
            if c == CTRL_A:
                write("\r\nraw REPL; CTRL-B to exit\r\n>")
                buf = bytearray()
            elif c == CTRL_B:
                write("\r\n")
                return
            elif c == CTRL_C:
                buf = bytearray()
            elif c == CTRL_D:
                if not buf:
                    write("\r\n")
                    sys.exit(EXIT_SOFT_RAW)
                _raw_exec(bytes(buf), False)
                break
            elif c == CTRL_E and not buf:
                if _read_byte() == ord("A") and _read_byte() == CTRL_A:
                    src = _raw_paste()
                    if src is not None:
                        _raw_exec(src, True)
                    break
            else:
                buf.append(c)


# --- friendly REPL --------------------------------------------------------------

def _needs_more(src):
    lines = src.split("\n")
    return lines[0].rstrip().endswith(":") and lines[-1].strip() != ""


def _read_line(prompt):
    write(prompt)
    line = bytearray()
    while True:
        c = _read_byte()
        if c in (13, 10):
            write("\r\n")
            return line.decode()
        if c == CTRL_C:             # the line cancelled, as the port's readline does
            write("\r\n")
            return c
        if c in (CTRL_A, CTRL_B, CTRL_D, CTRL_E) and not line:
            return c
        if c in (8, 127):
            if line:
                line = line[:-1]
                write("\x08 \x08")
        elif c >= 32 or c == 9:
            line.append(c)
            _out.buffer.write(bytes((c,)))


def _paste_mode():
    write("\r\npaste mode; Ctrl-C to cancel, Ctrl-D to finish\r\n=== ")
    buf = bytearray()
    while True:
        c = _read_byte()
        if c == CTRL_C:
            write("\r\n")
            return
        if c == CTRL_D:
            write("\r\n")
            run_user_code(IN_REPL, exec, compile(bytes(buf).decode(), "<stdin>", "exec"),
                          _globals)
            return
        buf.append(c)
        if c == 13:
            write("\r\n=== ")
        else:
            _out.buffer.write(bytes((c,)))


def friendly_repl(header=True):
    if header:
        write(banner())
    while True:
        got = _read_line(">>> ")
        if got == CTRL_C or got == "":
            continue
        if got == CTRL_A:
            write("\r\n")
            raw_repl()
            write(banner())
            continue
        if got == CTRL_B:
            write("\r\n" + banner())
            continue
        if got == CTRL_D:
            write("\r\n")
            sys.exit(EXIT_SOFT)
        if got == CTRL_E:
            _paste_mode()
            continue
        src = got
        while src is not None and _needs_more(src):
            more = _read_line("... ")
            if more == CTRL_C:      # the whole statement cancelled (pyexec.c)
                src = None
            elif not isinstance(more, str):
                break               # Ctrl-D: the statement as far as it goes
            else:
                src += "\n" + more
        if src is None:
            continue
        try:
            code = compile(src, "<stdin>", "single")
        except BaseException as e:
            sys.print_exception(e, _out)
            continue
        run_user_code(IN_REPL, exec, code, _globals)


def _resume(step):
    """Carry on where the VM before this one handed over (see run_user_code), silently."""
    if step == AFTER_BOOT_PY:
        _exec_file("main.py", AFTER_MAIN_PY)
    elif step in (AFTER_BOOT_PY_RAW, IN_RAW_REPL):
        raw_repl(header=step == AFTER_BOOT_PY_RAW)
    friendly_repl(header=step != IN_REPL)


# The chip's soft reset is the port's C (the heap and the VM made anew, the flash's
# filesystem mounted: some ms; a worse case here). Here it is a VM's exit and a fresh
# one's start and set-up, ~20 ms of the host's CPU beyond the wrapper's: at the chip's
# factor that was 3-10 s at x200, and mpremote waits 10 s for a soft reset. So the set-up
# costs the chip this, and the VM's end nothing (at chip speed: emu_drivers).
SET_UP_NS = 20_000_000


def main():
    try:
        emu_link.connect()
        _install_board_modules()
        _mount_board_fs()
    finally:
        emu_link.driver_end(SET_UP_NS)
    boot = os.getenv("CITYNODE_EMU_BOOT")
    if boot.startswith("resume"):
        _resume(int(boot[6:]))
        return
    if boot != "hard":
        write("MPY: soft reboot\r\n")
    if boot == "soft-raw":
        _exec_file("boot.py", AFTER_BOOT_PY_RAW)
        raw_repl()
    else:
        _exec_file("boot.py", AFTER_BOOT_PY)
        _exec_file("main.py", AFTER_MAIN_PY)
    friendly_repl()


try:
    main()
finally:
    emu_link.driver_begin()     # the VM's end: no part of the chip's reset (SET_UP_NS)
