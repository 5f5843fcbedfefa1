"""``workload.process``: process-wide state the scenario sets at the start
(after the fds, so a low RLIMIT_NOFILE cannot stop the workload building
them) and checks after the restore: umask, rlimits, signal actions, the
signal mask, pending signals (with their sigqueue values) and interval
timers.

Expected values come from the scenario, and where the kernel adjusts a
value (the SA_RESTORER libc adds, an itimer's remaining time) from what the
process saw of itself before the dump (the ready file).

Tolerance rule for an itimer's remaining time (getitimer): ITIMER_REAL runs
on wall time and keeps running while the process is frozen or sits in an
image, VIRTUAL and PROF only while it uses CPU; an engine may restore the
remaining time as of the dump. With V0 seen before the dump and E the wall
time since then: V0 - E - 2 s <= value <= V0 + 50 ms, and the interval is
exact.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from typing import Dict, List

from .core import check, within

try:
    from .. import sysapi
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import sysapi  # type: ignore[no-redef]

# SIGUSR1 wakes the workload and SIGIO serves dnotify: not for scenarios
SIGNALS = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTERM", "SIGCHLD", "SIGCONT",
           "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGURG", "SIGWINCH") + tuple(f"SIGRTMIN+{i}" for i in range(9))
RLIMITS = ("RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_STACK", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_AS",
           "RLIMIT_NPROC", "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_CPU",
           "RLIMIT_SIGPENDING")
ITIMERS = {"real": signal.ITIMER_REAL, "virtual": signal.ITIMER_VIRTUAL, "prof": signal.ITIMER_PROF}
HANDLERS = ("default", "ignore", "libc")
LATE_S, EARLY_S = 0.05, 2.0


def fields(s) -> dict:
    sig = s.Enum(SIGNALS, "a signal the workload allows:")
    return {
        "umask": s.Int(0, 0o777),
        "rlimits": s.Map({r: s.Limits() for r in RLIMITS}),
        "sigactions": s.Map({n: s.Map({"handler": s.Enum(HANDLERS),
                                       "flags": s.List_(s.Enum(tuple(sysapi.SA_FLAGS))),
                                       "mask": s.List_(sig)}, required=("handler",)) for n in SIGNALS}),
        "blocked": s.List_(sig),
        "pending": s.List_(s.Map({"signal": sig, "value": s.Int(0, 2**31 - 1)}, required=("signal",))),
        "itimers": s.Map({k: s.Map({"value_ms": s.Int(1), "interval_ms": s.Int(0)}, required=("value_ms",))
                          for k in ITIMERS}),
    }


def validate(p: dict) -> List[tuple]:
    out = []
    for i, x in enumerate(p.get("pending", [])):
        if x["signal"] not in p.get("blocked", []):
            out.append((f"pending[{i}]", f"{x['signal']} must be blocked to stay pending"))
        if "value" in x and not x["signal"].startswith("SIGRTMIN"):
            out.append((f"pending[{i}].value", "only real-time signals queue a value"))
    return out


def signum(name: str) -> int:
    if name.startswith("SIGRTMIN+"):
        return int(signal.SIGRTMIN) + int(name.split("+")[1])
    return int(signal.Signals[name])


def _handler(name: str) -> int:
    # a libc function as the handler: its address must survive the restore
    # exactly (same mapping), and it is harmless if ever called
    return {"default": 0, "ignore": 1, "libc": sysapi.libc_address("getpid")}[name]


def _limit(v: int) -> int:
    return resource.RLIM_INFINITY if v < 0 else v


def apply(p: dict) -> None:
    """Set the scenario's process state (the ``opener``)."""
    if "umask" in p:
        os.umask(int(p["umask"]))
    for name, (soft, hard) in (p.get("rlimits") or {}).items():
        resource.setrlimit(getattr(resource, name), (_limit(soft), _limit(hard)))
    for name, a in (p.get("sigactions") or {}).items():
        sysapi.sigaction_set(signum(name), _handler(a["handler"]),
                             sysapi.names_to_mask(a.get("flags", []), sysapi.SA_FLAGS),
                             [signum(m) for m in a.get("mask", [])])
    if p.get("blocked"):
        signal.pthread_sigmask(signal.SIG_BLOCK, [signum(n) for n in p["blocked"]])
    for x in p.get("pending") or []:
        if "value" in x:
            sysapi.sigqueue(os.getpid(), signum(x["signal"]), int(x["value"]))
        else:
            os.kill(os.getpid(), signum(x["signal"]))
    for name, t in (p.get("itimers") or {}).items():
        signal.setitimer(ITIMERS[name], int(t["value_ms"]) / 1000, int(t.get("interval_ms", 0)) / 1000)


def status() -> Dict[str, str]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def observe(p: dict) -> dict:
    """What the process sees of the state before the dump (``extras``)."""
    return {"sigactions": {n: sysapi.sigaction_get(signum(n)) for n in (p.get("sigactions") or {})},
            "blocked": status()["SigBlk"],
            "itimers": {n: list(signal.getitimer(ITIMERS[n])) for n in (p.get("itimers") or {})},
            "at": time.time()}


def expected_pending(p: dict) -> List[list]:
    """``[signo, value]`` in the order sigtimedwait hands them out: lowest
    number first; a standard signal once however often it was raised; each
    real-time one as often as it was queued, in queue order."""
    out, seen = [], set()
    for x in sorted(p.get("pending") or [], key=lambda x: signum(x["signal"])):
        n = signum(x["signal"])
        if n < signal.SIGRTMIN:
            if n in seen:
                continue
            seen.add(n)
        out.append([n, int(x.get("value", 0))])
    return out


def checker(p: dict, seen: dict, phase: str) -> List[dict]:
    """Verify after the restore (``seen``: :func:`observe` before the dump)."""
    out = []
    if phase == "inspect":
        st = status()
        if "umask" in p:
            out.append(check(None, "umask", f"{int(p['umask']):04o}", st.get("Umask")))
        for name, (soft, hard) in (p.get("rlimits") or {}).items():
            out.append(check(None, f"{name} (soft, hard)", [_limit(soft), _limit(hard)],
                             list(resource.getrlimit(getattr(resource, name)))))
        for name, a in (p.get("sigactions") or {}).items():
            now = sysapi.sigaction_get(signum(name))
            flags = sysapi.names_to_mask(a.get("flags", []), sysapi.SA_FLAGS)
            out.append(check(None, f"{name} action: handler address", hex(_handler(a["handler"])),
                             hex(now["handler"])))
            out.append(check(None, f"{name} action: flags", hex(seen["sigactions"][name]["flags"]), hex(now["flags"])))
            out.append(check(None, f"{name} action: flags asked for are set", hex(flags), hex(now["flags"] & flags)))
            out.append(check(None, f"{name} action: mask",
                             hex(sysapi.sigset_bits(signum(m) for m in a.get("mask", []))), hex(now["mask"])))
        if p.get("blocked"):
            out.append(check(None, "signal mask (SigBlk)", seen["blocked"], st.get("SigBlk")))
            bits = int(st.get("SigBlk", "0"), 16)
            want = [signum(n) for n in p["blocked"]]
            out.append(check(None, "the scenario's signals are blocked", sorted(want),
                             sorted(n for n in want if bits >> (n - 1) & 1)))
        if p.get("pending") is not None:
            pend = int(st.get("SigPnd", "0"), 16) | int(st.get("ShdPnd", "0"), 16)
            # SIGUSR1 is the harness's own wake-up, not the scenario's
            out.append(check(None, "pending signals (SigPnd | ShdPnd)",
                             sorted({s for s, _ in expected_pending(p)}),
                             [n for n in range(1, 65) if pend >> (n - 1) & 1 and n != signal.SIGUSR1]))
        for name, t in (p.get("itimers") or {}).items():
            value, interval = signal.getitimer(ITIMERS[name])
            v0, i0 = seen["itimers"][name]
            out.append(check(None, f"itimer {name}: interval (s)", i0, interval))
            out.append(check(None, f"itimer {name}: interval as asked (ms)", int(t.get("interval_ms", 0)),
                             round(interval * 1000)))
            elapsed = time.time() - seen["at"]
            out.append(within(None, f"itimer {name}: value (s): V0 - elapsed - 2 s .. V0 + 50 ms",
                              v0 - elapsed - EARLY_S, v0 + LATE_S, value))
    elif phase == "consume" and p.get("pending") is not None:
        sigs = [signum(n) for n in p.get("blocked", [])]
        got = []
        while len(got) < 64:
            signo, _code, value = sysapi.sigtimedwait_now(sigs)
            if not signo:
                break
            got.append([signo, value if signo >= signal.SIGRTMIN else 0])
        out.append(check(None, "pending signals taken by sigtimedwait ([signo, value], in order)",
                         expected_pending(p), got))
    return out
