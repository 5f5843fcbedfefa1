"""`ckpt survey`: the verdict `ckpt check` would give for every process on
the machine, and a map of what stops the refused ones.

The linux-cr developers counted the kernel objects their C/R lacked a
method for, per filesystem and per protocol. This is the live version: for
each process, exactly ``engine.dump.check`` (one process at a time, each
frozen only for its own check, never two at once), then each refusal is
given a *cause* (reason code + what caused it: fd kind, filesystem type,
socket family/type/state, mapping kind, process state) and the causes are
ranked by how many processes they block and how many they block alone
("fix this one and N more processes become restorable").

Read-only and safe on a busy machine: a process that exits (or whose PID is
reused) during the survey is reported as such, a process the engine cannot
inspect (kernel thread, zombie, ckpt itself or an ancestor, already traced)
is listed apart and is not counted as a refusal, a check that hangs is cut
off by a deadline (only where check's own cleanup restores the target, see
_on_alarm), SIGTERM/SIGHUP/SIGINT stop the survey between two
processes, and a safety net detaches any process still traced by us after
its check.

Pure functions (`cause_of`, `aggregate`, `render_table`) take plain dicts so
the ranking can be tested with canned verdicts.
"""

from __future__ import annotations

import fnmatch
import os
import re
import signal
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Callable, Dict, Iterable, List, Optional, Tuple

from . import procfs
from .context import Options
from .errors import EngineError, Refusal, UsageError

# Statuses of a surveyed process.
RESTORABLE = "restorable"
REFUSED = "refused"
UNINSPECTABLE = "uninspectable"   # kernel thread, zombie, self/ancestor, already traced
EXITED = "exited"                 # gone (or PID reused) before or during its check
ERROR = "error"                   # the check failed (not a refusal): listed, not counted
TIMEOUT = "timeout"               # the check did not finish within the deadline

NOT_INSPECTABLE = ("kernel-thread", "zombie", "self", "ptraced")
# Item kinds of engine/check.py that describe the process itself (not an fd
# or a mapping).
PROCESS_KINDS = ("process", "signals", "timers", "session", "credentials", "fs", "cpu", "memory")
# fd kinds that live on a filesystem worth naming (sockets, pipes and anon
# inodes sit on internal ones: sockfs, pipefs, anon_inodefs).
FS_KINDS = ("regular", "ghost", "directory", "device", "fifo", "pseudo")
DEFAULT_TIMEOUT = 20.0


class CheckTimeout(BaseException):
    """Raised from SIGALRM inside a check that overran its deadline, only
    where that is safe (see _on_alarm). A BaseException so the engine's
    `except Exception` paths do not swallow it; Task.seize and check()
    release the target on any BaseException."""


# -- listing -------------------------------------------------------------------

def _stat(pid: int, root: str = "/proc") -> Optional[dict]:
    try:
        with open(f"{root}/{pid}/stat") as f:
            text = f.read()
        st = procfs.parse_stat(text)
        st["starttime"] = int(text.rsplit(")", 1)[1].split()[19])   # field 22
        return st
    except (OSError, ValueError, IndexError):
        return None


def all_pids(root: str = "/proc") -> List[int]:
    return sorted(int(n) for n in os.listdir(root) if n.isdigit())


def select(pid=None, comm: Optional[str] = None, root: str = "/proc") -> Dict[int, dict]:
    """pid -> stat of the processes to survey: all, the trees under `pid`
    (a PID or a list of PIDs: each with its descendants), and/or those
    whose comm matches `comm` (exact name or shell pattern)."""
    stats = {}
    for p in all_pids(root):
        st = _stat(p, root)
        if st is not None:
            stats[p] = st
    if pid is not None:
        roots = [pid] if isinstance(pid, int) else list(pid)
        for r in roots:
            if r not in stats:
                raise UsageError(f"no process with PID {r}")
        kids: Dict[int, List[int]] = {}
        for p, st in stats.items():
            kids.setdefault(st["ppid"], []).append(p)
        keep, todo = set(), list(roots)
        while todo:
            p = todo.pop()
            if p not in keep:
                keep.add(p)
                todo.extend(kids.get(p, []))
        stats = {p: st for p, st in stats.items() if p in keep}
    if comm is not None:
        stats = {p: st for p, st in stats.items() if st["comm"] == comm or fnmatch.fnmatchcase(st["comm"], comm)}
    return stats


# -- causes --------------------------------------------------------------------

_NUM = re.compile(r"\b\d+\b")
_HEX = re.compile(r"\b(0x)?[0-9a-f]{6,}\b")


def normalize(text: str) -> str:
    """Numbers, addresses and PIDs out: so that the same cause in two
    processes is one histogram bar."""
    return _NUM.sub("N", _HEX.sub("X", text)).strip()


def socket_state(detail: str) -> str:
    """'tcp established 10.0.0.1:22->...: also held by pid 7' -> 'tcp
    established'; family, type and state only (engine/fds/socket.py
    describe() names them first)."""
    head, _, why = detail.partition(": ")
    w = head.split()
    if not w:
        return "socket"
    fam = w[0]
    if fam == "unix":
        state = w[2] if len(w) > 2 else ""
        if state == "connected" and "(socketpair)" in head:
            state = "socketpair"
        out = " ".join(x for x in (fam, w[1] if len(w) > 1 else "", state) if x)
    elif fam.startswith("tcp"):
        out = " ".join(w[:2])
    elif fam.startswith("udp"):
        out = f"{fam} unbound" if "unbound" in head else (f"{fam} connected" if "->" in head else f"{fam} bound")
    elif fam.startswith("inet"):
        out = " ".join(w[:4])
    elif fam in ("netlink", "packet"):
        out = " ".join(w[:2])
    elif fam == "family":
        out = " ".join(w[:3])
    elif fam == "socket":      # "socket inode N (details unavailable: ...)"
        out = "socket (details unavailable)"
    else:
        out = normalize(head)
    if why:
        out += ": " + normalize(re.sub(r"pid \d+ \(fd \d+\)", "another process", why))
    return out


def _device_name(link: str) -> str:
    return re.sub(r"\d+$", "N", link)


def cause_of(item: dict, refusal: dict, fdfacts: Optional[dict] = None) -> dict:
    """The cause of one refusal: {dim, value, label, facets}. `item` is the
    check item ({what, kind, detail}), `refusal` its as_dict(), `fdfacts`
    {fstype, link} read for a refused fd."""
    reason = refusal.get("reason", "?")
    detail = refusal.get("detail", "") or ""
    what = item.get("what", "")
    kind = item.get("kind", "")
    facets: Dict[str, str] = {}
    if what.startswith("fd "):
        dim = "fd"
        parts = what.split(" ", 2)
        link = (fdfacts or {}).get("link") or (parts[2] if len(parts) > 2 else "")
        fstype = (fdfacts or {}).get("fstype") or ""
        facets["fd kind"] = kind
        if kind == "socket":
            # The `socket` reason already says socket.
            value = socket_state(detail) if reason == "socket" else "socket " + socket_state(detail)
            facets["socket"] = socket_state(detail).split(": ")[0]
        elif kind == "device":
            value = f"device {_device_name(link)}"
        elif kind == "tty":
            value = "pty master" if link.endswith("ptmx") else "pty slave"
        elif kind == "unsupported":
            value = "fd " + normalize(link)
            facets["fd kind"] = "unsupported " + normalize(link)
        else:
            value = f"{kind} fd"
        if kind in FS_KINDS and fstype:
            facets["filesystem"] = fstype
            value += f" on {fstype}"
        if reason == "unsupported-state":
            # The reason names no fd kind: say which fd state it is.
            value += f" ({_short(detail)})"
    elif kind == "mapping":
        dim = "mapping"
        value = "mapping: " + normalize(detail)
        facets["mapping"] = normalize(detail)
    else:
        dim = "process"
        value = _process_cause(what, detail)
        facets["process state"] = value
    facets["reason"] = reason
    label = reason if value == reason else f"{reason}: {value}"
    return {"dim": dim, "value": value, "label": label, "facets": facets}


_PROCESS_LABELS = {"cwd": "cwd deleted", "root": "chrooted", "seccomp": "seccomp filters",
                   "children": "children", "threads": "threads", "pending signals": "pending signals",
                   "posix timers": "posix timers", "controlling terminal": "controlling terminal"}


def _short(detail: str) -> str:
    """First clause of a detail, parentheses and numbers out."""
    first = detail.split(";")[0]
    return normalize(re.sub(r"\s*\([^)]*\)", "", first))


def _process_cause(what: str, detail: str) -> str:
    if what == "namespaces":
        return "namespaces (" + detail.rsplit(": ", 1)[-1] + ")"
    if what == "credentials":
        return "credentials (no_new_privs)" if "no_new_privs" in detail else "credentials (ids/capabilities)"
    if what in _PROCESS_LABELS:
        return _PROCESS_LABELS[what]
    return _short(detail) or what or "process state"


# -- one process ---------------------------------------------------------------

def _mount_fstypes(pid: int) -> Dict[int, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right:
                    out[int(left.split()[0])] = right.split()[0]
    except (OSError, ValueError, IndexError):
        pass
    return out


def _fd_facts(pid: int, fds: Iterable[Tuple[int, str]]) -> Dict[int, dict]:
    """fd -> {link, fstype} for the refused fds, read after the release
    (running again: an fd that changed meanwhile gets no fstype)."""
    mounts = None
    out = {}
    for fd, link_then in fds:
        facts = {"link": link_then, "fstype": ""}
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link == link_then:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    info = procfs.parse_fdinfo(f.read())
                if mounts is None:
                    mounts = _mount_fstypes(pid)
                facts["fstype"] = mounts.get(int(info.get("mnt_id", "-1")), "")
        except (OSError, ValueError):
            pass
        out[fd] = facts
    return out


def _tracer_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(procfs.parse_status(f.read()).get("TracerPid", "0") or 0)
    except (OSError, ValueError):
        return 0


def _safety_net(pid: int, wait_s: float = 2.0) -> Optional[str]:
    """Detach `pid` if it is still traced by us (a check cut off inside its
    own cleanup, or a seize whose interrupt stop never came: a task in an
    uninterruptible wait). None when nothing had to be done, else what was
    done. Bounded: a task that does not reach a ptrace-stop within `wait_s`
    stays seized (never stopped by us) until this process exits, when the
    kernel detaches it (exit_ptrace)."""
    if _tracer_of(pid) != os.getpid():
        return None
    from . import ptrace
    try:
        ptrace.interrupt(pid)
    except Exception:
        pass
    end = time.monotonic() + wait_s
    while True:
        try:
            ptrace.detach(pid, 0)
            return "detached by the survey's safety net"
        except Exception:
            pass
        if time.monotonic() > end or _tracer_of(pid) != os.getpid():
            break
        try:
            ptrace.wait_nohang(pid)
        except Exception:
            pass
        time.sleep(0.01)
    if _tracer_of(pid) == os.getpid():
        return "still seized (not in a ptrace-stop); released when ckpt survey exits"
    return "detached by the survey's safety net"


def _same_process(pid: int, st: dict) -> bool:
    now = _stat(pid)
    return now is not None and now["starttime"] == st["starttime"] and now["state"] not in ("Z", "X")


def _checker(options: Options) -> Callable[[int], dict]:
    from .dump import check
    # One process at a time (never two frozen at once): a process with
    # children is judged alone, its children counted as `process-tree`.
    return lambda pid: check(pid, options, tree_ok=False)


def inspect(pid: int, st: dict, check: Callable[[int], dict], timeout: float = DEFAULT_TIMEOUT) -> dict:
    """The survey record of one process: its `ckpt check` verdict (the
    check itself is `check`, engine.dump.check) with a cause per refusal.
    Never raises for anything the process does (exit, fork, signals)."""
    from .check import target_checks
    rec = {"pid": pid, "ppid": st.get("ppid"), "comm": st.get("comm", "?"),
           "threads": st.get("num_threads", 1), "status": None, "refusals": []}
    try:
        target_checks(pid)
    except UsageError:
        return dict(rec, status=EXITED, note="exited before its check")
    except Refusal as r:
        return dict(rec, status=UNINSPECTABLE, note=r.reason, detail=r.detail)
    if not _same_process(pid, st):
        return dict(rec, status=EXITED, note="exited before its check")
    res, err = None, None
    t0 = time.monotonic()
    old = None
    use_alarm = timeout and timeout > 0 and _main_thread()
    try:
        if use_alarm:
            _deadline[:] = [timeout, time.monotonic()]
            old = signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            res = check(pid)
        finally:
            if use_alarm:
                # From here _on_alarm is a no-op. A SIGALRM the kernel
                # delivered before the cancel runs its Python handler at a
                # later bytecode: it must run while ours is installed, not
                # the caller's (a test's pytest-timeout took it for its own).
                _deadline.clear()
                signal.setitimer(signal.ITIMER_REAL, 0)
                _let_pending_handlers_run()
    except CheckTimeout as e:
        if res is None:     # (the alarm may ring just after check returned)
            # "freeze": the target never reached its interrupt stop; it may
            # stop a moment later, seized but untouched: the safety net
            # below detaches it.
            rec["cut_at"] = e.args[0] if e.args else "check"
            err = ("timeout", f"check did not finish within {timeout:g} s"
                   + (" (the process did not stop)" if rec["cut_at"] == "freeze" else ""))
    except Refusal as r:
        err = ("refusal", r)
    except UsageError as e:
        err = ("gone", e.message)
    except (EngineError, OSError) as e:
        err = ("error", getattr(e, "message", None) or str(e))
    except Exception as e:  # a bug of the engine on an odd process: listed, the survey goes on
        err = ("error", f"internal error: {type(e).__name__}: {e}")
    finally:
        if use_alarm and old is not None:
            _deadline.clear()       # (a cut raised inside the finally above skipped its end)
            signal.setitimer(signal.ITIMER_REAL, 0)
            _let_pending_handlers_run()
            signal.signal(signal.SIGALRM, old)
    rec["check_ms"] = round((time.monotonic() - t0) * 1000, 2)
    net = _safety_net(pid)
    if net:
        rec["safety_net"] = net
    gone = not _same_process(pid, st)
    if err is not None:
        what, e = err
        if what == "refusal":
            if gone:
                return dict(rec, status=EXITED, note="exited during survey")
            if e.reason == "no-such-process":
                # Alive, but something vanished under the check (an fd
                # closed by another thread): no verdict for it.
                return dict(rec, status=ERROR, note=f"changed while checked: {e.detail}")
            if e.reason in NOT_INSPECTABLE:
                return dict(rec, status=UNINSPECTABLE, note=e.reason, detail=e.detail)
            # A refusal before the pre-flight (e.g. stopped by job control).
            item = {"what": "process state" if e.fd is None else f"fd {e.fd} {e.path or ''}",
                    "kind": "process", "detail": e.message}
            rd = e.as_dict()
            rec["refusals"] = [dict(rd, what=item["what"], kind=item["kind"], cause=cause_of(item, rd))]
            return dict(rec, status=REFUSED)
        if gone:
            return dict(rec, status=EXITED, note="exited during survey")
        return dict(rec, status=TIMEOUT if what == "timeout" else ERROR, note=str(e))
    if gone:
        # Its verdict is of a process that is no more: not counted.
        return dict(rec, status=EXITED, note="exited during survey (after its check)")
    refused_items = [i for i in res.get("items", []) if i.get("verdict") == "refused"]
    refusals = res.get("refusals", [])
    fdlist = []
    for item in refused_items:
        if item.get("what", "").startswith("fd "):
            parts = item["what"].split(" ", 2)
            try:
                fdlist.append((int(parts[1]), parts[2] if len(parts) > 2 else ""))
            except ValueError:
                pass
    facts = _fd_facts(pid, fdlist)
    out = []
    for n, r in enumerate(refusals):
        # check() appends an item and a refusal together (Survey.refuse):
        # the n-th refused item is the n-th refusal.
        item = refused_items[n] if n < len(refused_items) else {"what": "", "kind": "process"}
        fdf = None
        if item.get("what", "").startswith("fd "):
            try:
                fdf = facts.get(int(item["what"].split(" ", 2)[1]))
            except ValueError:
                fdf = None
        out.append(dict(r, what=item.get("what", ""), kind=item.get("kind", ""), cause=cause_of(item, r, fdf)))
    rec["refusals"] = out
    rec["status"] = REFUSED if out or not res.get("ok", True) else RESTORABLE
    return rec


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# Where a CheckTimeout may be raised. An exception inside a check is only
# harmless where the check's own cleanup then restores the target:
# - inside Task.seize's wait for the interrupt stop (the place a check is
#   known to hang: a task in an uninterruptible sleep never stops); seize
#   detaches, registers untouched. Always allowed.
# - never inside these Task methods: between an injected syscall's entry
#   and exit stops a release would run a syscall with the target's own
#   registers; inside release() the target would stay traced; inside
#   settle() it may be running (taking a signal), not stopped;
# - never directly in dump.check/dump, Task.seize or the ptrace wrappers:
#   there an exception can fall between the seize and the try whose
#   finally releases (the target would stay seized).
# Elsewhere (reading /proc, sock_diag ...) only once the check has overrun
# FALLBACK times its deadline: a hang that is not the freeze's.
_UNSAFE = frozenset({"syscall", "_resume_to_syscall_stop", "call", "release", "set_regs", "set_xstate",
                     "write_mem", "kill", "settle", "_deliver_one"})
_UNSAFE_THREADS = frozenset({"freeze", "finish_freeze", "release", "kill"})
FALLBACK = 3.0
_deadline: List[float] = []     # [timeout, start] of the check in flight


def _where(frame) -> Tuple[str, str]:
    return os.path.basename(frame.f_code.co_filename), frame.f_code.co_name


def _in_seize_wait(frame) -> bool:
    return (frame is not None and _where(frame) == ("ptrace.py", "wait") and frame.f_back is not None
            and _where(frame.f_back) == ("task.py", "seize"))


def _safe_to_interrupt(frame) -> bool:
    """Not inside a ptrace operation, the freeze or the release, and not in
    the check's own body (dump.py's frames: the bytecodes of its finally
    before it calls threads.release are there): an exception in any of
    those would skip the release and leave the target seized with its
    signals blocked (seen: a cut at the first line of threads.release,
    which the list of unsafe task.py functions alone did not name). Inside
    the frozen survey's callees the check's finally releases the target."""
    if frame is None:
        return False
    if _where(frame)[0] in ("dump.py", "ptrace.py") or _where(frame) == ("task.py", "seize"):
        return False
    f = frame
    while f is not None:
        where = _where(f)
        if (where[0] == "task.py" and where[1] in _UNSAFE) or (where[0] == "threads.py" and where[1] in _UNSAFE_THREADS):
            return False
        if where[0] == "dumpbatch.py":
            return False    # the target may be running the batch's code: only its own ending puts it back
        f = f.f_back
    return True


def _let_pending_handlers_run() -> None:
    """A Python-level call: the interpreter runs the handlers of signals
    already delivered at its entry (the eval breaker)."""


def _on_alarm(signum, frame):
    if not _deadline:
        return      # the check is over (a late SIGALRM): nothing to cut, nothing to re-arm
    if _in_seize_wait(frame):
        raise CheckTimeout("freeze")
    if _deadline and time.monotonic() - _deadline[1] >= FALLBACK * _deadline[0] and _safe_to_interrupt(frame):
        raise CheckTimeout("check")
    # Not here: let the check go on, look again soon.
    signal.setitimer(signal.ITIMER_REAL, min(0.5, max(_deadline[0] if _deadline else 0.5, 0.001)))


_stop_signal: List[int] = []


def _on_term(signum, frame):
    # Deferred to between two processes: an exception raised inside a
    # check could interrupt a syscall injection (see _on_alarm).
    _stop_signal.append(signum)


# -- the whole machine ---------------------------------------------------------

def aggregate(records: List[dict]) -> dict:
    """Counts, histograms and the ranking of causes from survey records.

    A cause *blocks* a process when one of the process's refusals has it;
    it blocks it *alone* when it is the process's only cause: fixing that
    cause makes exactly those processes restorable. `cumulative` is the
    number restorable after fixing this cause and every one ranked above."""
    counts: Dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    refused = [r for r in records if r["status"] == REFUSED]
    causes: Dict[str, dict] = {}
    per_proc: List[set] = []
    by_reason: Dict[str, dict] = {}
    facets: Dict[str, Dict[str, dict]] = {}
    for r in refused:
        mine = set()
        seen_facets = set()
        for ref in r["refusals"]:
            c = ref["cause"]
            key = c["label"]
            mine.add(key)
            e = causes.setdefault(key, {"label": key, "reason": ref.get("reason"), "dim": c["dim"],
                                        "value": c["value"], "processes": 0, "alone": 0, "refusals": 0,
                                        "pids": []})
            e["refusals"] += 1
            rr = by_reason.setdefault(ref.get("reason"), {"processes": 0, "refusals": 0, "_pids": set()})
            rr["refusals"] += 1
            rr["_pids"].add(r["pid"])
            for dim, val in c["facets"].items():
                if dim == "reason":
                    continue
                f = facets.setdefault(dim, {}).setdefault(val, {"processes": 0, "refusals": 0})
                f["refusals"] += 1
                if (dim, val) not in seen_facets:
                    seen_facets.add((dim, val))
                    f["processes"] += 1
        for key in mine:
            causes[key]["processes"] += 1
            if len(causes[key]["pids"]) < 50:
                causes[key]["pids"].append(r["pid"])
            if len(mine) == 1:
                causes[key]["alone"] += 1
        per_proc.append(mine)
    for rr in by_reason.values():
        rr["processes"] = len(rr.pop("_pids"))
    ranking = sorted(causes.values(), key=lambda c: (-c["processes"], -c["alone"], c["label"]))
    fixed: set = set()
    for c in ranking:
        fixed.add(c["label"])
        c["cumulative"] = counts.get(RESTORABLE, 0) + sum(1 for s in per_proc if s <= fixed)
    sort = lambda d: dict(sorted(d.items(), key=lambda kv: (-kv[1]["processes"], -kv[1]["refusals"], kv[0])))
    return {"counts": counts, "surveyed": len(records),
            "inspected": counts.get(RESTORABLE, 0) + counts.get(REFUSED, 0),
            "causes": ranking, "by_reason": sort(by_reason),
            "facets": {dim: sort(vals) for dim, vals in sorted(facets.items())}}


def survey(pid=None, comm: Optional[str] = None, options: Optional[Options] = None,
           timeout: float = DEFAULT_TIMEOUT, check: Optional[Callable[[int], dict]] = None,
           progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Survey the machine (or a tree / a comm). Returns {host, kernel, arch,
    records, summary, ...}. Raises Refusal(capability | kernel-missing) as
    ckpt check would, UsageError for an unknown --pid."""
    from .check import require_features
    if check is None:
        require_features()
        # no probes: a survey looks, it does not write into other processes' eventfds
        import copy
        opts = copy.copy(options) if options is not None else Options()
        opts.probe = False
        check = _checker(opts)
    t0 = time.monotonic()
    targets = select(pid, comm)
    records = []
    olds = {}
    del _stop_signal[:]
    if _main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            olds[sig] = signal.signal(sig, _on_term)
    interrupted = None
    try:
        for n, (p, st) in enumerate(sorted(targets.items())):
            if _stop_signal:
                break
            if progress:
                progress(n, len(targets))
            records.append(inspect(p, st, check, timeout))
    finally:
        for sig, h in olds.items():
            signal.signal(sig, h)
    if _stop_signal:
        interrupted = f"interrupted by signal {_stop_signal[0]} ({signal.Signals(_stop_signal[0]).name})"
    # Processes born while we surveyed: not inspected, only counted.
    try:
        born = [p for p in all_pids() if p not in targets and (pid is None and comm is None)]
    except OSError:
        born = []
    u = os.uname()
    out = {"host": u.nodename, "kernel": u.release, "arch": u.machine, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "scope": {"pid": pid, "comm": comm}, "elapsed_s": round(time.monotonic() - t0, 2),
           "appeared_during_survey": len(born), "records": records, "summary": aggregate(records)}
    if interrupted:
        out["interrupted"] = interrupted
    return out


# -- rendering -----------------------------------------------------------------

def _table(rows: List[List[str]], head: List[str], right: Iterable[int] = ()) -> List[str]:
    right = set(right)
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    def line(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


def render_table(res: dict, top: int = 25, list_processes: bool = False) -> str:
    s = res["summary"]
    c = s["counts"]
    lines = [f"ckpt survey: {res.get('host')} {res.get('arch')} {res.get('kernel')}: "
             f"{s['surveyed']} processes in {res.get('elapsed_s', 0)} s",
             f"  restorable {c.get(RESTORABLE, 0)}, refused {c.get(REFUSED, 0)}  "
             f"(of {s['inspected']} inspected)",
             f"  not inspectable {c.get(UNINSPECTABLE, 0)} ({_notes(res, UNINSPECTABLE)}), "
             f"exited during survey {c.get(EXITED, 0)}, check failed {c.get(ERROR, 0) + c.get(TIMEOUT, 0)}, "
             f"appeared during survey {res.get('appeared_during_survey', 0)}"]
    if res.get("interrupted"):
        lines.append(f"  INTERRUPTED: {res['interrupted']} (partial survey)")
    if s["causes"]:
        lines += ["", "Causes, by processes blocked (alone: fix this one and N more processes become restorable):"]
        rows = [[str(x["processes"]), str(x["alone"]), str(x["cumulative"]), x["reason"], x["value"]]
                for x in s["causes"][:top]]
        lines += _table(rows, ["blocks", "alone", "cumul", "reason", "cause"], right=(0, 1, 2))
        if len(s["causes"]) > top:
            lines.append(f"  ... {len(s['causes']) - top} more causes (--json for all)")
        lines += ["", "Refusals by reason code:"]
        lines += _table([[str(v["processes"]), str(v["refusals"]), k] for k, v in s["by_reason"].items()],
                        ["procs", "refusals", "reason"], right=(0, 1))
        for dim, vals in s["facets"].items():
            lines += ["", f"By {dim}:"]
            lines += _table([[str(v["processes"]), str(v["refusals"]), k] for k, v in list(vals.items())[:top]],
                            ["procs", "refusals", dim], right=(0, 1))
    ok = [r for r in res["records"] if r["status"] == RESTORABLE]
    if ok:
        lines += ["", "Restorable: " + ", ".join(f"{r['pid']} {r['comm']}" for r in ok[:40])
                  + (" ..." if len(ok) > 40 else "")]
    if list_processes:
        lines += ["", "Processes:"]
        rows = []
        for r in res["records"]:
            why = "; ".join(sorted({x["cause"]["label"] for x in r["refusals"]})) or r.get("note", "")
            rows.append([str(r["pid"]), r["comm"], r["status"], why])
        lines += _table(rows, ["pid", "comm", "status", "why"], right=(0,))
    return "\n".join(lines)


def _notes(res: dict, status: str) -> str:
    by: Dict[str, int] = {}
    for r in res["records"]:
        if r["status"] == status:
            by[r.get("note", "?")] = by.get(r.get("note", "?"), 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(by.items(), key=lambda kv: -kv[1])) or "none"


def run_cli(args, options: Options) -> dict:
    """`ckpt survey` from parsed arguments; writes --html FILE."""
    res = survey(pid=args.pid, comm=args.comm, options=options, timeout=args.timeout)
    if args.html:
        from .survey_html import render_html
        tmp = args.html + ".tmp"
        with open(tmp, "w") as f:
            f.write(render_html(res))
        os.replace(tmp, args.html)
        res["html"] = args.html
    if getattr(args, "processes", False) and not args.json:
        res["_list_processes"] = True
    return res
