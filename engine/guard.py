"""Killing or interrupting ckpt at any instant must not hurt the target.

A tracer that dies lets its tracees go as they are (kernel/ptrace.c
exit_ptrace). Between two injected syscalls a dumped thread has its own
registers (engine/task.py puts them back after each one) and the scratch
bytes it may hold are below its stack's red zone, where nothing lives; but
its signal mask is ~0 (engine/signals.py) and during an injection its
registers point into the vdso. So ckpt's own process - the one a user, a
CI job or a ^C signals - never traces anything:

* ``ckpt dump`` forks a *worker* that does the whole dump and reports on a
  pipe. The worker blocks every job-control and termination signal (a ^C
  to the terminal's process group cannot land mid-injection) and asks the
  kernel for SIGUSR2 when ckpt dies (PR_SET_PDEATHSIG); SIGUSR2, or a
  SIGINT/SIGTERM/SIGHUP ckpt forwards, only *requests* a stop, which the
  next fault point honours (engine/faults.py: a point is a place where an
  exception is proven to unwind cleanly - registers and mask back, detach,
  partial image removed). Past the commit rename the dump is done and is
  finished (the target killed, or left running).
* ckpt is the worker's *guardian*: the worker tells it, right after the
  freeze, every thread's own signal mask; if the worker dies without a
  report (SIGKILLed itself, crashed), ckpt seizes each thread still there
  and puts its mask back. What a dead worker cannot leave behind is
  checked, not assumed (tests/test_reliability.py, bench/reliability.py).
* ``ckpt restore``'s restorer gets the same stop request when ckpt dies;
  a stop (or its own death: PTRACE_O_EXITKILL) kills the half-built
  process, and the image is only ever read.
"""

from __future__ import annotations

import marshal
import os
import _signal      # not signal: signal.py builds its enums at import (enum: ~20 ms of a run under TCG)
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Callable, Dict, Optional

from . import faults
from .errors import EngineError

PR_SET_PDEATHSIG = 1
STOP_SIGNAL = _signal.SIGUSR2
# Signals a terminal, a shell or a supervisor sends to a whole process group.
HELD = {_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGTSTP,
        _signal.SIGTTIN, _signal.SIGTTOU, _signal.SIGUSR1}
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)

_report_fd: Optional[int] = None
_ckpt_sid: Optional[int] = None     # ckpt's session, in a worker that left it
_ckpt_pid: Optional[int] = None     # the ckpt command's pid, in its worker


def ckpt_session() -> int:
    """The session of the ckpt command, also in its worker (which calls
    setsid()): what a target's session is compared with (engine/check.py),
    the session a restore run from the same place puts it back in."""
    return _ckpt_sid if _ckpt_sid is not None else os.getsid(0)


def _pdeathsig(sig: int) -> None:
    import ctypes       # here: ckpt's own process (the guardian) needs none; its worker imports it anyway
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def ckpt_pid() -> int:
    """The ckpt command's pid, also in its worker."""
    return _ckpt_pid if _ckpt_pid is not None else os.getpid()


def become_worker(parent: int, report_fd: Optional[int] = None) -> None:
    """In a freshly forked worker (or restorer): hold the group signals,
    turn ckpt's death and STOP_SIGNAL into a stop request."""
    global _report_fd, _ckpt_sid, _ckpt_pid
    _report_fd = report_fd
    _signal.pthread_sigmask(_signal.SIG_BLOCK, HELD)
    if report_fd is not None:
        _ckpt_pid = parent
        _ckpt_sid = os.getsid(0)
        os.setsid()     # out of ckpt's process group: a kill -9 of the group reaches ckpt only
    _signal.signal(STOP_SIGNAL, lambda s, f: faults.request_abort("ckpt was killed or interrupted"))
    _pdeathsig(STOP_SIGNAL)
    if os.getppid() != parent:        # it died before the prctl
        faults.request_abort("ckpt was killed")


def _send(fd: int, kind: str, obj) -> None:
    # marshal for plain data (masks, a dump's result); pickle, whose import
    # costs every run ~1.5 ms, only for what marshal cannot carry (an exception)
    try:
        data = b"M" + marshal.dumps((kind, obj))
    except ValueError:
        import pickle
        data = b"P" + pickle.dumps((kind, obj))
    os.write(fd, struct.pack("<I", len(data)) + data)


def frozen(masks: Dict[int, int]) -> None:
    """Tell the guardian each frozen thread's own signal mask (worker side;
    nothing when not running under a guardian)."""
    if _report_fd is not None:
        try:
            _send(_report_fd, "frozen", masks)
        except OSError:
            pass


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            b = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _messages(data: bytes):
    off = 0
    while off + 4 <= len(data):
        n, = struct.unpack_from("<I", data, off)
        if off + 4 + n > len(data):
            return
        try:
            body = data[off + 5:off + 4 + n]
            if data[off + 4:off + 5] == b"M":
                yield marshal.loads(body)
            else:
                import pickle
                yield pickle.loads(body)
        except Exception:  # noqa: BLE001 - a torn message from a dying worker
            return
        off += 4 + n


def run(fn: Callable, *args):
    """Run fn(*args) in a worker process; return its result or raise what
    it raised. ckpt's SIGINT/SIGTERM/SIGHUP become a stop request."""
    r, w = os.pipe()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        os.close(r)
        code = 0
        try:
            become_worker(parent, w)
            try:
                if os.environ.get("CKPT_PROFILE"):     # (engine/profiling.py imported only then)
                    from .profiling import run as profiled
                    out = ("ok", profiled(getattr(fn, "__name__", "work"), fn, *args))
                else:
                    out = ("ok", fn(*args))
            except BaseException as e:   # noqa: BLE001 - handed to ckpt, which raises it
                out = ("raise", e)
                code = 1
            try:
                _send(w, *out)
            except Exception as e:      # noqa: BLE001 - an unpicklable result
                _send(w, "raise", EngineError(f"worker result not transferable: {e!r}"))
        finally:
            os._exit(code)
    os.close(w)
    old = {}

    def forward(sig, frame):
        try:
            os.kill(child, STOP_SIGNAL)
        except ProcessLookupError:
            pass
    for s in FORWARDED:
        old[s] = _signal.signal(s, forward)
    try:
        data = _read_all(r)
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
    finally:
        os.close(r)
        for s, h in old.items():
            _signal.signal(s, h)
    masks: Dict[int, int] = {}
    result = None
    for kind, obj in _messages(data):
        if kind == "frozen":
            masks.update(obj)
        elif kind in ("ok", "raise"):
            result = (kind, obj)
    if result is None:
        fixed = restore_masks(masks)
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        raise EngineError(f"the dump worker died ({how}) without a report"
                          + (f"; the target's signal mask was put back ({fixed})" if fixed else ""))
    if result[0] == "raise":
        raise result[1]
    return result[1]


# ~0 as the kernel keeps it (SIGKILL and SIGSTOP cannot be blocked).
FROZEN_MASK = ((1 << 64) - 1) & ~((1 << (_signal.SIGKILL - 1)) | (1 << (_signal.SIGSTOP - 1)))


def _blocked(tid: int) -> Optional[int]:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("SigBlk:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


def restore_masks(masks: Dict[int, int]) -> str:
    """Guardian: after a worker died, give each thread it had frozen its
    own signal mask back (its registers are its own between injections).
    Returns what was done."""
    from . import ptrace
    done = []
    for tid, mask in sorted(masks.items()):
        if _blocked(tid) != FROZEN_MASK:
            continue      # let go already (its mask is its own again), or gone
        try:
            ptrace.seize(tid, 0)
        except Exception:  # noqa: BLE001 - gone, or traced again by someone else
            continue
        try:
            ptrace.interrupt(tid)
            while True:
                st = ptrace.wait(tid)
                if st.exited:
                    break
                if st.event_stop:
                    ptrace.set_sigmask(tid, mask)
                    done.append(str(tid))
                    break
                ptrace.interrupt(tid)
                ptrace.cont(tid, st.sig if st.signal_stop else 0)
        except Exception:  # noqa: BLE001 - best effort, per thread
            pass
        finally:
            try:
                ptrace.detach(tid, 0)
            except Exception:  # noqa: BLE001
                pass
    return ", ".join(f"thread {t}" for t in done)
