"""Start the workload as a fork of a warm seed instead of a new python3.

Runs in the guest (stdlib only). ``workload.py spawn`` execs ``python3 -S
workload_run.py run SPEC MARK`` for every scenario: interpreter start-up and
imports, several tenths of a second under TCG. The agent starts a *seed*
once (:func:`start_seed`, before the golden snapshot): a python3 started as
the exec'd workload is, with the modules ``run`` needs imported, waiting on
a socket. When ``spawn`` runs in a fork of the agent (harness/agent.py
marks the script module it calls, :func:`agent_fork`), it asks the seed
for a fork (:func:`ask_seed`), which becomes the workload without an exec
(:func:`become`). Not a fork of the agent itself: that carried the agent's
memory (its warm engine, the harness's helpers, their garbage) into every
image the engine dumps and restores (11.4 MB against an exec'd workload's
3.5 MB in a TCG guest: dump +0.7 s and restore +0.5 s, against 0.16 s
saved at the start; medians of 5 alternating pairs).

On by default (the runner passes ``--exec`` when ``CRUCIBLE_WARM_WORKLOAD=0``).
It was opt-in while a fork of the seed held 5.2 MB of anonymous memory
against the exec'd workload's 3.5 MB, and the dump and restore gave back
what its start saved. Most of that was one import: the warm path's
``import traceback`` (linecache, tokenize, textwrap, contextlib: ~0.15 s
under TCG and their objects in every image), now imported on a failure
only. Compared by /proc/PID/smaps in a TCG guest (pipe/empty): 4.4 MB warm
against 4.2 MB exec'd; in alternating pairs from the golden snapshot,
ready 0.31 s against 0.67 s, dump and restore +0.03 s each. Judged clean
before (427 scenario runs with it on, none corrupted; every mutant killed
warm as exec'd).

What a fresh exec would have, and how the fork gets it:

* session, stdio on /dev/null, no other fd, spawn's cwd and environment
  (compared: another one and the seed declines, spawn execs).
* ``/proc/PID/cmdline`` (the judge's mutants re-exec it to fake a restore,
  world.pidstate and workloads_under find workloads by its MARK) and
  ``/proc/PID/environ``: prctl(PR_SET_MM, PR_SET_MM_MAP) points the
  arg_start..arg_end and env_start..env_end boundaries at buffers holding
  the exact argv and the environment execve would have been given (this
  process's C ``environ``). PR_SET_MM_MAP needs no CAP_SYS_RESOURCE
  (kernel/sys.c prctl_set_mm_map; the single-field PR_SET_MM_ARG_START
  would), only CONFIG_CHECKPOINT_RESTORE, which the engine's restore needs
  too. Read back and compared; any difference and the child execs instead.
* signal dispositions as execve leaves them and python3 sets them
  (:func:`exec_signals`: the seed's SIGCHLD handler goes); the mask, umask,
  rlimits, cgroup, session and credentials are inherited alike by fork and
  exec. Its parent is the seed (status.PPid, which the judge lets differ).
* threads: a fork keeps only the calling thread; the seed runs none (checked:
  a process with more than one would hold locks the child can never take).
* python3's own options: the seed runs with the workload's (``-S``).
* sys.argv / sys.orig_argv, std streams over fds 0-2, no exit handlers;
  the seed's objects collected and frozen (out of the workload's
  collections) before it serves.

What the fork does not re-create: the memory layout and contents are the
seed's (one ASLR draw per golden snapshot, this module imported). The
workload's checks and the judge read neither, but the judge compares
/proc/PID/maps before the dump and after the restore, and a mapping the
fork inherited never merges with one the workload adds right next to it
(mm/mmap.c is_mergeable_anon_vma), where a restore's fresh mappings may
merge. Anonymous neighbours (a pymalloc arena, a large malloc against an
inherited one) the judge compares as one for every engine
(statediff.merge_neighbours: a program sees the same memory either way).
The [heap] is named and compared piece by piece, so it must not grow by
brk: :func:`prepare_parent` leaves the forks a large free top, and
:func:`wall_heap` maps an inaccessible page at its end, so that what the top
cannot give malloc takes from anonymous mmaps.

A SigBlk corruption once seen with warm workloads only (about one scenario
in 13, before-dump snapshots showing SIGUSR1 blocked) was the judge's:
quiet_snapshot's stillness reads, which a wake-up and a tick could fall
between (procstate._opening says how), caught exec'd workloads alike once
measured (the first snapshot after ready: 1 in 40 warm, 2 in 40 exec'd, in
a TCG guest); ftrace in the guest showed warm workloads get no signal and
no early (EINTR) wake-up.
"""

from __future__ import annotations

import _signal
import atexit
import ctypes
import errno
import gc
import io
import marshal
import os
import struct
import sys

TYPE_CHECKING = False   # annotations only (typing is ~2 ms of imports)
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Sequence


#: python3's options for the workload (workload.spawn execs ``python3 -S``)
FLAGS = ["-S"]
PR_SET_MM, PR_SET_MM_MAP = 35, 14
_STAT = {"start_code": 26, "end_code": 27, "start_stack": 28, "start_data": 45, "end_data": 46,
         "start_brk": 47, "arg_start": 48, "arg_end": 49, "env_start": 50, "env_end": 51}
# glibc's soname (as sysapi.LIBC): ctypes.util.find_library runs ldconfig -p
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.sbrk.restype = ctypes.c_void_p
_libc.sbrk.argtypes = [ctypes.c_long]
_libc.malloc_trim.argtypes = [ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
#: the argv and environment buffers /proc/PID/cmdline and environ read: alive
#: as long as the process (a restore brings them back with its memory)
_KEEP: List[object] = []


#: the warm seed's socket (abstract), set in the agent by start_seed before it
#: forks any script: spawn, a fork of the agent, asks the seed for its workload
SEED: Optional[str] = None
PR_SET_PDEATHSIG = 1


class Cold(Exception):
    """The fork cannot be made what the exec would be: exec instead (why)."""


def agent_fork(module_globals: Dict[str, object]) -> bool:
    """Does this script run in a fork of the agent? harness/agent.py
    child_exec sets ``AGENT_FORK`` in the module whose main it calls."""
    return bool(module_globals.get("AGENT_FORK"))


def why_cold() -> str:
    """In the parent, before the fork: why the child must exec ("" = it may fork)."""
    if os.environ.get("CRUCIBLE_WARM_WORKLOAD", "1") == "0":
        return "CRUCIBLE_WARM_WORKLOAD=0"
    flags = interpreter_flags()
    if flags != FLAGS:
        return f"this python3 runs with options {flags}, the workload's with {FLAGS}"
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError as e:
        return f"cannot count threads: {e.strerror}"
    if threads != 1:
        return f"{threads} threads (a fork keeps one; the others' locks stay taken)"
    return ""


def block(items: Sequence[bytes]) -> bytes:
    """NUL-terminated strings end to end, as execve lays out argv and envp."""
    return b"".join(i + b"\0" for i in items)


def c_environ() -> List[bytes]:
    """The C ``environ`` of this process: what execve(path, argv, environ)
    (os.execv) hands the new program."""
    # the global scope (dlsym(RTLD_DEFAULT)), not libc's own symbol: a python3
    # that links libpython statically (Debian's) has a copy relocation of
    # `environ`, and libc's definition is then a NULL nobody uses
    env = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), "environ")
    out = []
    i = 0
    while env[i] is not None:
        out.append(env[i])
        i += 1
    return out


def _stat_fields() -> Dict[str, int]:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()   # after the last ')': comm may hold spaces
    return {k: int(fields[n - 3]) for k, n in _STAT.items()}


def set_args_env(argv: bytes, env: bytes) -> None:
    """Point /proc/self/cmdline at ``argv`` and /proc/self/environ at
    ``env`` (NUL-terminated blocks), every other boundary unchanged."""
    abuf = ctypes.create_string_buffer(argv, len(argv))
    ebuf = ctypes.create_string_buffer(env, max(len(env), 1))
    a, e = ctypes.addressof(abuf), ctypes.addressof(ebuf)
    m = _stat_fields()
    # brk is not in /proc/self/stat: the kernel's current one (this thread is
    # the only one and allocates nothing between this and the prctl)
    brk = _libc.sbrk(0)
    st = struct.pack("<11QQII", m["start_code"], m["end_code"], m["start_data"], m["end_data"], m["start_brk"],
                     brk, m["start_stack"], a, a + len(argv), e, e + len(env), 0, 0, 0xFFFFFFFF)
    sbuf = ctypes.create_string_buffer(st, len(st))
    if _libc.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.addressof(sbuf), len(st), 0) != 0:
        err = ctypes.get_errno()
        raise Cold(f"prctl(PR_SET_MM_MAP): {os.strerror(err)} (errno {err})")
    _KEEP.extend((abuf, ebuf))
    for name, want in (("cmdline", argv), ("environ", env)):
        with open(f"/proc/self/{name}", "rb") as f:
            got = f.read()
        if got != want:
            raise Cold(f"/proc/self/{name} reads {got[:200]!r} after PR_SET_MM_MAP, not {want[:200]!r}")


def become(argv: List[str]) -> None:
    """In the workload's child, its session, stdio and fds already as the
    exec'd one's: make the rest of the process what ``execv(argv[0], argv)``
    of python3 would be, up to where python3 calls the script's main.
    Raises :class:`Cold` when something cannot be made identical."""
    if len(os.listdir("/proc/self/task")) != 1:
        raise Cold("more than one thread")
    env = c_environ()
    if {k.encode(): v.encode() for k, v in os.environ.items()} != dict(e.split(b"=", 1) for e in env if b"=" in e):
        # os.environ is what the new python3 would parse from that block
        raise Cold("os.environ differs from the C environ (an os.putenv/unsetenv bypassed it)")
    set_args_env(block(os.fsencode(a) for a in argv), block(env))
    script = [a for a in argv[1:] if not a.startswith("-")]
    sys.argv = script
    if hasattr(sys, "orig_argv"):
        sys.orig_argv = list(argv)
    exec_signals()
    std_streams(bool(getattr(sys.__stdout__, "write_through", False)))
    atexit._clear()             # the parent's; the workload's run registers none
    # What only an agent holds (its warm engine, harness/zygote.py: never
    # in the seed) goes, and with the parent's garbage its pages: a fresh
    # python3 holds neither, and every page the workload holds is one more
    # for the engine to dump and restore. The garbage goes now, not in the
    # workload's own collection (the harness already snapshotting the
    # process), and what stays is left out of every later one.
    for name in [n for n in sys.modules if n.split(".")[0] in AGENT_ONLY]:
        del sys.modules[name]
    gc.collect()
    gc.freeze()
    # the freed pages inside the heap back to the kernel (not its free top:
    # see prepare_parent)
    _libc.malloc_trim(HEAP_PAD)
    wall_heap()
    sys.excepthook, sys.displayhook = sys.__excepthook__, sys.__displayhook__
    sys.unraisablehook = sys.__unraisablehook__


M_TRIM_THRESHOLD, M_TOP_PAD = -1, -2      # mallopt(3)
#: top-level packages the agent imports for itself that a workload never uses
AGENT_ONLY = frozenset({"engine"})
#: free heap the seed keeps for its forks (virtual: untouched pages cost nothing)
HEAP_PAD = 64 << 20


def prepare_parent() -> None:
    """In the seed, once, before any fork: leave a large free top in the
    heap, never trimmed (the seed's heap is its own, not a fork's: it grows
    in one VMA). A VMA a fork inherits never merges with one the
    child adds next to it (mm/mmap.c is_mergeable_anon_vma: its anon_vma
    chain is not singular), so a warm workload whose heap grew would show a
    [heap] in two pieces, which a restore (fresh mappings, merged) cannot
    reproduce and the judge would call corrupted. With the top there, the
    workload's mallocs come from it and its heap does not grow."""
    _libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    _libc.mallopt(M_TOP_PAD, HEAP_PAD)
    _libc.malloc.restype = ctypes.c_void_p
    _libc.malloc.argtypes = [ctypes.c_size_t]
    _libc.free.argtypes = [ctypes.c_void_p]
    start = _libc.sbrk(0)
    blocks = []
    while _libc.sbrk(0) == start and len(blocks) < 4096:   # until the heap grew once, by HEAP_PAD more
        blocks.append(_libc.malloc(64 << 10))               # below the mmap threshold: from the heap
    for b in blocks:
        _libc.free(b)


PROT_NONE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0, 0x02, 0x20, 0x100000
MAP_FAILED = ctypes.c_void_p(-1).value
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def wall_heap() -> None:
    """In the fork, once the agent's heap is all it will inherit: one
    inaccessible page right at the heap's end, so that brk can never grow
    it. The inherited [heap] cannot take the growth into its own VMA (its
    anon_vma chain is the agent's and its own: mm/mmap.c
    is_mergeable_anon_vma), so growth past prepare_parent's free top would
    be a second [heap] VMA, which no restore reproduces (it maps the heap
    afresh, in one piece) and the judge would call corrupted. With brk
    walled, glibc's malloc takes what the top cannot give from mmap
    instead (its main arena goes non-contiguous): anonymous mappings, which
    a restore may merge with their neighbours and the judge compares as one
    (statediff.merge_neighbours). The wall is a mapping the process has
    from then on, dumped and restored like any other."""
    page = os.sysconf("SC_PAGE_SIZE")
    end = (_libc.sbrk(0) + page - 1) & ~(page - 1)
    got = _libc.mmap(end, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    if got == end:
        return
    err = ctypes.get_errno()
    if got not in (None, MAP_FAILED):     # a kernel that took the address as a hint only
        _libc.munmap(got, page)
        raise Cold(f"mmap(MAP_FIXED_NOREPLACE) placed the heap's wall at {got:#x}, not {end:#x}")
    if err != errno.EEXIST:               # EEXIST: a mapping is there already, brk cannot grow anyway
        raise Cold(f"cannot wall the heap at {end:#x}: {os.strerror(err)} (errno {err})")


def start_seed(run_script: str, timeout: float = 120) -> str:
    """In the agent: start the *seed*, the process every warm workload is
    forked from, and wait until it serves; "" or why there is none.

    A fork of the agent itself would carry the agent's memory (its warm
    engine, the harness's helpers, all they allocated) into every workload
    and so into every image the engine dumps and restores (11.4 MB against
    an exec'd workload's 3.5 MB in a TCG guest: the 0.16 s the warm start
    gained, 1.2 s lost in the dump and the restore). The seed is a python3
    started as the exec'd workload is (``python3 -S workload_run.py seed
    FD AGENT``, harness/workload.py): it imports what ``run`` needs and
    this module, and waits on the agent's listening socket (fd FD, an
    abstract address spawn finds in :data:`SEED`); it dies with the agent."""
    global SEED
    import socket
    import subprocess
    name = f"\0crucible-warm-seed-{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(name)
        srv.listen(16)
        p = subprocess.Popen([sys.executable, *FLAGS, run_script, "seed", str(srv.fileno()), str(os.getpid())],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, close_fds=True,
                             pass_fds=(srv.fileno(),), cwd="/")
    finally:
        srv.close()
    import select
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    line = p.stdout.readline() if ready else b""
    p.stdout.close()
    if line.strip() != b"serving":
        p.kill()
        return f"the warm seed did not start: {line[:200]!r}"
    SEED = name
    return ""


def serve_seed(fd: int, agent: int, run) -> None:  # pragma: no cover - the seed; never returns
    """The seed's loop (``run``: workload._run_warm). It leaves its forks a
    free heap top (prepare_parent: its heap is its own, so growing it now
    keeps it one VMA) and nothing to collect; each request is answered with
    the PID of a fork that becomes the workload (:func:`_seed_fork`)."""
    import _socket
    _libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
    if os.getppid() != agent:
        os._exit(0)
    srv = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)
    prepare_parent()
    gc.collect()
    gc.freeze()

    def reap(_sig, _frame):     # the workloads are the seed's children
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
    _signal.signal(_signal.SIGCHLD, reap)
    os.write(1, b"serving\n")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    while True:
        cfd, _ = srv._accept()
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, cfd)
        try:
            try:
                rep = _seed_fork(marshal.loads(_all(conn)), srv, conn, run)
            except Exception as e:   # noqa: BLE001 - spawn execs then, and says why
                rep = {"cold": f"the warm seed failed: {type(e).__name__}: {e}"}
            conn.sendall(marshal.dumps(rep))
        except OSError:
            pass
        finally:
            conn.close()


def _all(conn) -> bytes:
    """What the peer sends until it shuts its side."""
    out = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(out)
        out.append(chunk)


def _seed_fork(req: dict, srv, conn, run) -> dict:  # pragma: no cover - the seed
    """Fork the workload ``req`` asks for: what spawn's own child would be
    (its session, stdio on /dev/null, no other fd, spawn's cwd), then
    become it (``run``), or exec it when that cannot be exact."""
    argv, spec = [str(a) for a in req["argv"]], str(req["spec"])
    if req.get("env") != dict(os.environ):
        return {"cold": "spawn's environment is not the one the warm seed started with"}
    pid = os.fork()
    if pid == 0:
        try:
            conn.close()
            srv.close()
            os.setsid()
            os.chdir(str(req["cwd"]))
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, 65536)
            run(argv, spec)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    return {"pid": pid}


def ask_seed(argv: List[str], spec_path: str, timeout: float = 30) -> int:
    """In spawn (a fork of the agent): the PID of the workload the seed
    forked for ``argv``; raises :class:`Cold` (why) when there is none."""
    if SEED is None:
        raise Cold("no warm seed (the agent did not start one)")
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(SEED)
        s.sendall(marshal.dumps({"argv": list(argv), "spec": spec_path, "env": dict(os.environ), "cwd": os.getcwd()}))
        s.shutdown(socket.SHUT_WR)
        data = _all(s)
    except OSError as e:
        raise Cold(f"the warm seed did not answer: {e}") from None
    finally:
        s.close()
    try:
        rep = marshal.loads(data)
    except (ValueError, EOFError, TypeError):
        raise Cold(f"the warm seed answered {data[:200]!r}") from None
    if "pid" in rep:
        return int(rep["pid"])
    raise Cold(str(rep.get("cold") or "the warm seed refused"))


def workload_argv(script: str, spec_path: str, mark: str, python: Optional[str] = None) -> List[str]:
    """The argv the exec'd workload has (workload.spawn)."""
    python = python or sys.executable
    return [python, *FLAGS, os.path.abspath(script), "run", spec_path, mark]


def interpreter_flags() -> Optional[List[str]]:
    """This python3's own options (those before its script), None if unknown."""
    argv = getattr(sys, "orig_argv", None)
    if argv is None:
        return None
    flags = []
    for a in argv[1:]:
        if not a.startswith("-"):
            return flags
        flags.append(a)
    return flags


def exec_signals() -> None:
    """Dispositions as execve(2) leaves them (handled -> default, ignored
    stays ignored), then as python3 sets them at start: SIGPIPE and SIGXFSZ
    ignored, SIGINT its KeyboardInterrupt handler when it was default."""
    for s in range(1, _signal.NSIG):
        if s in (_signal.SIGKILL, _signal.SIGSTOP):
            continue
        try:
            h = _signal.getsignal(s)
        except ValueError:
            continue
        if h is None:            # set outside Python: leave as the kernel has it (exec keeps it too)
            continue
        if h != _signal.SIG_IGN and h != _signal.SIG_DFL:
            try:
                _signal.signal(s, _signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    for s in (_signal.SIGPIPE, getattr(_signal, "SIGXFSZ", None)):
        if s is not None:
            _signal.signal(s, _signal.SIG_IGN)
    if _signal.getsignal(_signal.SIGINT) == _signal.SIG_DFL:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)


def std_streams(unbuffered: bool) -> None:
    """sys.stdin/stdout/stderr over fds 0-2 as python3's start-up makes them
    (pylifecycle.c create_stdio; the encoding and errors the zygote's own
    got from the same environment)."""
    old = (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__)
    _KEEP.append(old)
    made = []
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        ref = getattr(sys, "__" + name + "__", None) or getattr(sys, name)
        raw_only = unbuffered and mode == "w"
        buf = io.open(fd, mode + "b", 0 if raw_only else -1, closefd=False)
        (buf if raw_only else buf.raw).name = f"<{name}>"
        text = io.TextIOWrapper(buf, encoding=ref.encoding, errors=ref.errors, newline="\n",
                                line_buffering=not unbuffered and (os.isatty(fd) or fd == 2),
                                write_through=unbuffered)
        text.mode = mode
        made.append(text)
    sys.stdin, sys.stdout, sys.stderr = made
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = made
