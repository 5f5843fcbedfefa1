"""The resident agent: one process per guest, started before the golden
snapshot and so present, idle and warm, in every reverted guest.

Runs in the guest (stdlib only, Python >= 3.9) as a script::

    python3 agent.py PORT_NAME     # serve requests on the virtio-serial port
    python3 agent.py --stdin       # serve them on fd 0 (a socket; the host tests)

Why: under TCG every step cost an SSH exec (~0.15 s) and, for the harness's
own steps, a python3 start that imports and compiles its modules (~0.5-1 s);
and every revert dropped the SSH connection, whose key exchange (~1 s) had
to run again. A virtio-serial port is a QEMU chardev, host state that a
loadvm does not touch, so the host's connection to it outlives every revert,
and the agent behind it comes back from the snapshot already waiting.

Protocol: one JSON object a line each way. A request is ``{"id": N, "op":
..., ...}``, its reply ``{"id": N, ...}`` (``"error"`` on failure). Ids are
the host's: after a revert the agent may be answered a request the
pre-revert guest never finished, and the host drops replies it did not ask
for. Ops:

* ``ping`` -> ``{"pid", "zygote"}`` (why the warm engine is off, "" = on)
* ``run`` ``argv, timeout[, stdin_b64, env, cwd, warm]`` -> ``{"rc", "stdout_b64",
  "stderr_b64", "timeout", "warm"[, "cold_why"]}``: fork/exec in a new session
  (as sshd runs a command), stdin the given bytes or /dev/null, the agent's
  environment and cwd unless given; on timeout the session is SIGKILLed.
  With ``warm`` a ``ckpt`` command runs in a fork of the agent's warm engine
  (harness/zygote.py) when that is exact, else it is exec'd and ``cold_why``
  says why.
* ``script`` the same, for ``[python3, <scripts>/X.py, args...]``: the child
  is a fork of the agent that calls X's main with the modules the agent
  imported at start (no new interpreter, nothing recompiled).
* ``put`` ``path, bulk[, mode]`` / ``get`` ``path`` -> ``{"bulk"}``: the file's
  bytes follow the JSON line raw, ``bulk`` of them (no base64, no JSON
  string: encoding a megabyte image that way cost a TCG guest a second each
  way). The older ``data_b64`` field is still read. With ``fresh`` (a
  directory, absolute, at least two levels deep) that tree is removed
  first: a scenario's work dir made anew in one request, not three execs.
* ``gone`` ``pids, seconds`` -> ``{"left"}``: wait until no /proc/PID of
  ``pids`` is there (a zombie still holds its PID), at most ``seconds``;
  ``left`` lists the ones still there (a shell loop of ``date`` and
  ``sleep`` execs did this before, ~0.15 s a scenario under TCG).
* ``clock`` ``t``: set CLOCK_REALTIME (a loadvm rewinds it).
"""

from __future__ import annotations

import base64
import errno
import importlib
import json
import os
import select
import signal
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
#: the guest scripts a ``script`` request may name, and their entry points
SCRIPTS = {"workload.py": "main", "world.py": "_main", "mutants.py": "main",
           # a program scenario's spawn, insession and after (harness/programrun.py):
           # exec'd, each paid python3's start and its imports (subprocess, socket,
           # re, hashlib: ~0.5 s under TCG)
           "program.py": "main"}
OUTPUT_LIMIT = 64 << 20
#: the warm engine (loaded by preload; its note says why it is off)
ZYGOTE = None


def find_port(name: str) -> str:
    """The /dev node of the virtio-serial port called ``name`` (no udev in
    the guest to make /dev/virtio-ports/NAME: sysfs has the names)."""
    base = "/sys/class/virtio-ports"
    for _ in range(100):
        try:
            for vp in os.listdir(base):
                with open(f"{base}/{vp}/name") as f:
                    if f.read().strip() == name:
                        return f"/dev/{vp}"
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"agent: no virtio-serial port named {name}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def preload() -> None:
    """Import the guest scripts once, here, so each forked step has them,
    and the engine for warm ``ckpt`` commands."""
    global ZYGOTE
    # the interpreter's own sys.path (what a new python3 has after its
    # script dir or cwd, and its PYTHONPATH)
    pp = [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    base = [p for p in sys.path[1:] if p not in pp]
    try:
        import zygote
        ZYGOTE = zygote.Zygote(os.environ.get("CRUCIBLE_ZYGOTE_COMMAND", "ckpt"),
                               os.environ.get("CRUCIBLE_ZYGOTE_ROOT") or None)
        ZYGOTE.load(base)
    except Exception:  # no warm engine: every ckpt is exec'd
        traceback.print_exc()
    sys.path.insert(0, HERE)
    try:    # the process warm workloads are forked from (harness/warmfork.py start_seed)
        why = importlib.import_module("warmfork").start_seed(os.path.join(HERE, "workload_run.py"))
        if why:
            print(f"agent: {why}", file=sys.stderr)
    except Exception:  # no seed: every workload is exec'd
        traceback.print_exc()
    for name in SCRIPTS:
        try:
            mod = importlib.import_module(name[:-3])
            # what the script imports only on first use (to keep the exec'd
            # workload's start light): once here, not in every fork
            for dep in getattr(mod, "PRELOAD", ()):
                importlib.import_module(dep)
        except Exception:  # a missing optional script: its requests fail alone
            traceback.print_exc()


def child_exec(argv: List[str], script: bool, warm: bool = False, env: Optional[Dict[str, str]] = None,
               cwd: Optional[str] = None) -> None:  # pragma: no cover - runs in the child
    try:
        os.setsid()
        if cwd:
            os.chdir(cwd)
        if warm:
            ZYGOTE.child(argv, dict(os.environ) if env is None else env)
        if script:
            name = os.path.basename(argv[1])
            mod = sys.modules[name[:-3]]
            # tells the script it runs in a fork of the agent (workload.py
            # starts its workload warm then: harness/warmfork.py)
            mod.AGENT_FORK = True
            sys.argv = [argv[1]] + argv[2:]
            # the parent's buffered streams must not be flushed twice
            sys.stdout = os.fdopen(1, "w", closefd=False)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            try:
                rc = getattr(mod, SCRIPTS[name])(argv[2:])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc or 0)
        if env is not None:
            os.execvpe(argv[0], argv, env)
        os.execvp(argv[0], argv)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(127)


def run(argv: List[str], timeout: float, stdin: bytes, script: bool, warm: bool = False,
        env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> Dict[str, Any]:
    """Fork, feed stdin, collect stdout/stderr until the child exits and its
    pipes close (or, past the exit, 0.3 s: a detached grandchild may hold
    them, as the SSH channel's EOF_GRACE allows). The child's exit wakes
    the loop (a pidfd), not a poll: a short command costs no 20-50 ms wait."""
    pipes = [os.pipe() for _ in range(3)]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.dup2(pipes[0][0], 0)
        os.dup2(pipes[1][1], 1)
        os.dup2(pipes[2][1], 2)
        os.closerange(3, 65536)
        child_exec(argv, script, warm, env, cwd)
    for fd in (pipes[0][0], pipes[1][1], pipes[2][1]):
        os.close(fd)
    w = pipes[0][1]
    try:
        pidfd: Optional[int] = os.pidfd_open(pid)
    except (AttributeError, OSError):      # Python < 3.9 or kernel < 5.3: poll
        pidfd = None
    out, err = [], []
    open_fds = {pipes[1][0]: out, pipes[2][0]: err}
    deadline = time.monotonic() + timeout
    status: Optional[int] = None
    exited_at = None
    timed_out = False
    pending = stdin
    try:
        while True:
            if status is None:
                got, st = os.waitpid(pid, os.WNOHANG)
                if got:
                    status, exited_at = st, time.monotonic()
            now = time.monotonic()
            if status is not None and (not open_fds or now - exited_at > 0.3):
                break
            if now >= deadline and status is None:
                timed_out = True
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
                _, status = os.waitpid(pid, 0)
                break
            wl = [w] if w is not None and pending else []
            if w is not None and not pending:
                os.close(w)
                w = None
            rl = list(open_fds)
            if status is None:
                if pidfd is not None:
                    rl.append(pidfd)
                wait = deadline - now if pidfd is not None else 0.05
            else:
                wait = exited_at + 0.3 - now
            r, wr, _ = select.select(rl, wl, [], max(0.0, wait))
            for fd in r:
                if fd == pidfd:
                    continue            # it exited: the waitpid above reaps it
                chunk = os.read(fd, 65536)
                if chunk and sum(map(len, open_fds[fd])) < OUTPUT_LIMIT:
                    open_fds[fd].append(chunk)
                elif not chunk:
                    os.close(fd)
                    del open_fds[fd]
            if wr:
                try:
                    n = os.write(w, pending[:65536])
                    pending = pending[n:]
                except BrokenPipeError:
                    pending = b""
    finally:
        for fd in list(open_fds) + ([w] if w is not None else []) + ([pidfd] if pidfd is not None else []):
            os.close(fd)
    rc = -1 if status is None else (os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    return {"rc": rc, "stdout_b64": _b64(b"".join(out)), "stderr_b64": _b64(b"".join(err)), "timeout": timed_out,
            "warm": warm}


def wait_gone(pids: List[int], seconds: float) -> List[int]:
    """Poll until none of ``pids`` has a /proc entry, at most ``seconds``;
    the ones left."""
    deadline = time.monotonic() + seconds
    while True:
        left = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.01)


def handle(req: Dict[str, Any], bulk: bytes = b"") -> Dict[str, Any]:
    """One request (``bulk``: the raw bytes that followed its line); a
    reply's ``bulk`` (bytes) is sent raw after its line."""
    op = req.get("op")
    if op == "ping":
        return {"pid": os.getpid(), "zygote": ZYGOTE.note if ZYGOTE is not None else "not loaded"}
    if op in ("run", "script"):
        argv = [str(a) for a in req["argv"]]
        stdin = base64.b64decode(req.get("stdin_b64") or "")
        script = op == "script" and len(argv) >= 2 and os.path.basename(argv[1]) in SCRIPTS \
            and os.path.basename(argv[1])[:-3] in sys.modules
        env = {str(k): str(v) for k, v in req["env"].items()} if req.get("env") is not None else None
        cwd = req.get("cwd") or None
        cold = ""
        if op == "run" and req.get("warm"):
            if ZYGOTE is None or not ZYGOTE.wants(argv):
                cold = ZYGOTE.note if ZYGOTE is not None and ZYGOTE.note else "not a ckpt command"
            else:
                cold = ZYGOTE.why_cold(dict(os.environ) if env is None else env, cwd or os.getcwd())
        rep = run(argv, float(req.get("timeout", 60)), stdin, script, warm=bool(req.get("warm")) and not cold,
                  env=env, cwd=cwd)
        if cold:
            rep["cold_why"] = cold
        return rep
    if op == "put":
        path = req["path"]
        if req.get("fresh"):
            fresh = os.path.normpath(str(req["fresh"]))
            if not os.path.isabs(fresh) or fresh.count("/") < 2:
                return {"error": f"put: will not remove {fresh!r} (absolute and two levels deep only)"}
            import shutil
            shutil.rmtree(fresh, ignore_errors=True)
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        with open(path, "wb") as f:
            f.write(bulk if "bulk" in req else base64.b64decode(req["data_b64"]))
        if req.get("mode") is not None:
            os.chmod(path, int(req["mode"]) & 0o7777)
        return {}
    if op == "get":
        with open(req["path"], "rb") as f:
            return {"bulk": f.read()}
    if op == "gone":
        return {"left": wait_gone([int(p) for p in req["pids"]], float(req.get("seconds", 3)))}
    if op == "clock":
        time.clock_settime(time.CLOCK_REALTIME, float(req["t"]))
        return {}
    return {"error": f"unknown op {op!r}"}


def serve(fd: int, eof_ends: bool = False) -> None:
    """Answer requests read from ``fd`` (the port; a socket in the tests,
    whose EOF ends the agent: a port's only means the host is not there).

    A ``put`` carries a whole file (a migrated image: megabytes) as raw
    bytes after its line, read from the port in small pieces: only each new
    piece is searched for a newline and nothing is copied per piece
    (``bytes +=`` and a search of the whole base64 line each time made a
    10 MB image cost minutes under TCG). A line that is not a request (the
    tail of one cut by a revert) is skipped."""
    buf = bytearray()
    while True:
        chunk = _read(fd, eof_ends)
        if chunk is None:
            return
        start = len(buf)
        buf += chunk
        nl = buf.find(b"\n", start)
        while nl >= 0:
            line = bytes(buf[:nl])
            try:
                req = json.loads(line)
            except ValueError:
                req = None      # the tail of a line cut by a revert
            if not isinstance(req, dict) or "op" not in req:
                del buf[:nl + 1]
                nl = buf.find(b"\n")
                continue
            need = req.get("bulk") or 0
            if not isinstance(need, int) or need < 0:
                need = 0
            if len(buf) >= nl + 1 + need:       # the request's raw bytes follow its line
                bulk = bytes(buf[nl + 1:nl + 1 + need])
                del buf[:nl + 1 + need]
            else:
                bulk = _receive(fd, bytes(buf[nl + 1:]), need, eof_ends)
                del buf[:]
                if bulk is None:
                    return
            nl = buf.find(b"\n")
            try:
                rep = handle(req, bulk)
            except Exception as e:
                rep = {"error": f"{type(e).__name__}: {e}"}
            rep["id"] = req.get("id")
            payload = rep.pop("bulk", None)
            if payload is not None:
                rep["bulk"] = len(payload)
            _write_all(fd, (json.dumps(rep) + "\n").encode())
            if payload:
                _write_all(fd, payload)


#: where large request bytes are read (:func:`_receive`); made and touched
#: before the golden snapshot (:func:`main`), so resident in every revert
RECV: Any = bytearray(0)
RECV_SIZE = 16 << 20


def recv_area(size: int):
    """:data:`RECV`: an anonymous mapping of ``size`` bytes, touched (its
    pages are the process's) with zeros (the golden snapshot stores a page
    of zeros as a flag, not 4 KiB to load back at every revert), and left
    out of every fork (MADV_DONTFORK): only this process reads into it, and
    each of the agent's forks (every step, every warm ckpt) copied its 4096
    page-table entries and dropped them again at exit (~4 ms a fork and
    exit under TCG, several forks a scenario). A fork that touched it would
    fault: none does (scripts, the warm engine and exec'd commands only)."""
    import mmap
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area[::4096] = bytes(len(range(0, size, 4096)))
    if hasattr(area, "madvise") and hasattr(mmap, "MADV_DONTFORK"):
        area.madvise(mmap.MADV_DONTFORK)
    return area


def _receive(fd: int, head: bytes, need: int, eof_ends: bool = False):
    """A request's ``need`` raw bytes, ``head`` the first of them (read
    already), the rest read straight into :data:`RECV` (a memoryview of it
    is returned, valid until the next request; None: the peer is gone).

    Why: a port read gives at most one 4 KiB buffer, and appending each to
    a growing bytearray made the first megabytes a reverted agent took in
    crawl (a 10 MB image put after a revert: 4-8 s under TCG, against
    0.7-1 s for the same put again): memory new to the process since the
    snapshot, every page of it. RECV was touched before the snapshot."""
    global RECV
    if need > len(RECV):
        RECV = bytearray(need)      # larger than any image before: as before, slower
    view = memoryview(RECV)[:need]
    view[:len(head)] = head
    got = len(head)
    while got < need:
        try:
            n = os.readv(fd, [view[got:]])
        except OSError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                continue
            raise
        if n:
            got += n
        elif eof_ends:
            return None
        else:
            time.sleep(0.05)        # the host end is not connected: wait for it
    return view


def _read(fd: int, eof_ends: bool = False) -> Optional[bytes]:
    """The next bytes from ``fd``; None when a socket's peer is gone."""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except OSError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                continue
            raise
        if chunk:
            return chunk
        if eof_ends:
            return None
        time.sleep(0.05)        # the host end is not connected: wait for it


def _write_all(fd: int, data: bytes) -> None:
    out = memoryview(data)
    while out:
        n = os.write(fd, out)
        out = out[n:]


def main(argv: List[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    fd = 0 if argv[0] == "--stdin" else os.open(find_port(argv[0]), os.O_RDWR)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    global RECV
    RECV = recv_area(RECV_SIZE)
    preload()
    serve(fd, eof_ends=fd == 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
