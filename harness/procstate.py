"""Everything /proc shows about a process, taken from outside it.

Runs in the guest (stdlib only, Python >= 3.9). The harness takes one
snapshot of the workload right before the dump and one right after the
restore (before the workload is asked to check itself), and diffs them on
the host (harness/statediff.py). Nothing here comes from the engine or from
files the workload wrote: it is what the kernel says about the process.

A snapshot is a flat ``{field: value}`` dict of strings, so a diff can name
the exact field (``status.SigBlk``, ``fd.5.fdinfo.pos``, ``maps.7``...).

It also reads the workload's *proof of continuation* straight out of its
memory (/proc/PID/mem): the in-memory secret and the tick counter, at the
addresses the workload published when it started.
"""

from __future__ import annotations

import os
import re
import time
from typing import Dict, Optional

# status lines that are usage counters or per-boot facts, not process state
_STATUS_SKIP = {"State", "VmPeak", "VmSize", "VmLck", "VmPin", "VmHWM", "VmRSS", "RssAnon", "RssFile",
                "RssShmem", "VmData", "VmStk", "VmExe", "VmLib", "VmPTE", "VmSwap", "HugetlbPages",
                "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches", "SigQ", "Threads", "CoreDumping",
                "untag_mask", "Kthread"}
# /proc/PID/stat fields (1-based after pid and comm, as proc(5) numbers them) that are state
_STAT_FIELDS = {"pgrp": 5, "session": 6, "tty_nr": 7, "priority": 18, "nice": 19, "rt_priority": 40,
                "policy": 41, "exit_signal": 38,
                # the memory layout's markers (PR_SET_MM_MAP): where the
                # program break starts, code, data, the stack, argv, environ
                "start_code": 26, "end_code": 27, "start_stack": 28, "start_data": 45, "end_data": 46,
                "start_brk": 47, "arg_start": 48, "arg_end": 49, "env_start": 50, "env_end": 51}
# "tfd:        5 events: 19 data: 5 ..." (epoll), "inotify wd:1 ino:..." (inotify)
_ITEM = re.compile(r"^(tfd|inotify wd|fanotify ino):\s*(\S+)\s+(.*)$")
_ANON_NUM = re.compile(r"^(pipe|socket|anon_inode|net|mnt|pid|user|uts|ipc|cgroup|time):\[?(\d+)\]?$")


def _read(path: str, binary: bool = False) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    return data.hex() if binary else data.decode(errors="replace")


def _link(path: str) -> Optional[str]:
    try:
        return os.readlink(path)
    except OSError:
        return None


def read_mem(pid: int, addr: int, length: int) -> Optional[bytes]:
    """Bytes out of another process's memory, or None if they cannot be read."""
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
            f.seek(addr)
            return f.read(length)
    except (OSError, ValueError, OverflowError):
        return None


def proof(pid: int, pub: Optional[dict]) -> Dict[str, Optional[str]]:
    """The secret (hex) and the counter, read from outside at the published addresses."""
    if not pub:
        return {}
    secret = read_mem(pid, int(pub["secret_addr"]), int(pub["secret_len"]))
    counter = read_mem(pid, int(pub["counter_addr"]), 8)
    return {"secret": secret.hex() if secret else None,
            "counter": str(int.from_bytes(counter, "little")) if counter and len(counter) == 8 else None}


def _syscall(pid: int) -> Optional[str]:
    text = _read(f"/proc/{pid}/syscall")
    return text.strip() if text else None


def quiet_snapshot(pid: int, pub: Optional[dict] = None, seconds: float = 15.0,
                   full_tries: int = 3) -> Dict[str, str]:
    """A snapshot taken while the process sleeps in one and the same system
    call from before to after (/proc/PID/syscall unchanged, and for a
    workload not one tick in between): some state exists only outside the
    sleep (sigtimedwait unblocks the signals it waits for while it waits),
    so a snapshot that straddles a wake-up would mix two moments.

    Under TCG on a busy host the whole snapshot can take longer than a
    workload's tick and then never holds still. What differs between the
    moments is the task state /proc/PID/status and the threads' status show
    (signal masks, pending sets): after `full_tries` whole snapshots, only
    those are taken again, quickly, until one holds still, and they replace
    the whole snapshot's. Falls back to the last whole snapshot after
    `seconds` (a process that never sleeps)."""
    # A quiet workload (harness/memstate.py) first: the wait for its quiet
    # sleep, then its memory; the rest of the snapshot does not wake it.
    mem = _memstate().quiet_digest(pid, pub) if pub and pub.get("quiet") else {}
    deadline = time.monotonic() + seconds
    snap: Dict[str, str] = {}
    tries = 0
    while True:
        before = _opening(pid, pub)
        part = snapshot(pid, pub) if tries < full_tries else _moment(pid)
        after = _closing(pid, pub)
        if tries < full_tries:
            snap = part
        tries += 1
        if not part:
            return part
        # "-1 SP PC": blocked outside any system call (a page fault: a warm
        # workload's first writes to the pages it shares with the agent),
        # its masks those of a process awake. And asleep (S) at both ends:
        # a task blocked on its way out of the call (a page fault writing to
        # its memory, mask already back) still shows the call's line.
        if before[0] and before == after and not before[0].startswith(("running", "-1 ")) and before[2] == "S":
            snap.update(part)
            return dict(snap, **mem)
        if time.monotonic() > deadline:
            return dict(snap, **mem)
        time.sleep(0.005)


# The reads before and after the snapshot bracket it: the counter first
# and last, the call and the state inside. No read is a moment: in the
# order before (call, counter on both sides) a tick could fall between
# the call and the counter, the call read in the sleep before the tick and
# the counter after it; the status read in between then caught the task
# awake (SigBlk of one awake, judged corrupted: in a TCG guest 1 first
# snapshot in 40 of warm workloads, 2 in 40 of exec'd ones). Bracketed, an
# unchanged counter means no tick from before the first read to after the
# last, and asleep (S) in the call at both inner ends means asleep in it
# throughout: the workload leaves that sleep only to tick before its next.
def _memstate():
    try:
        from . import memstate
    except ImportError:  # pragma: no cover - in the guest, a top-level module beside this one
        import memstate  # type: ignore[no-redef]
    return memstate


def _opening(pid: int, pub: Optional[dict]) -> tuple:
    counter = proof(pid, pub).get("counter")
    call = _syscall(pid)
    return call, counter, _state(pid)


def _closing(pid: int, pub: Optional[dict]) -> tuple:
    state = _state(pid)
    call = _syscall(pid)
    return call, proof(pid, pub).get("counter"), state


def _state(pid: int) -> Optional[str]:
    text = _read(f"/proc/{pid}/stat")
    return text.rsplit(")", 1)[1].split()[0] if text and ")" in text else None


def _moment(pid: int) -> Dict[str, str]:
    """The part of snapshot() that depends on the moment: the status lines
    of the process and of its threads."""
    base = f"/proc/{pid}"
    text = _read(f"{base}/status")
    if text is None:
        return {}
    out: Dict[str, str] = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key and key not in _STATUS_SKIP:
            out[f"status.{key}"] = " ".join(val.split())
    out.update(_threads(base))
    return out


# Per-thread state a restore must give each thread back (the process-wide
# rest is in the leader's status): thread.TID.<field>
_THREAD_STAT = ("nice", "priority", "rt_priority", "policy")
_THREAD_STATUS = ("Name", "TracerPid", "SigBlk", "SigPnd", "Cpus_allowed_list", "NoNewPrivs", "Seccomp",
                  "Uid", "Gid", "CapEff")


def _threads(base: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    try:
        tids = os.listdir(f"{base}/task")
    except OSError:
        return out
    for tid in tids:
        tb = f"{base}/task/{tid}"
        st = _read(f"{tb}/stat")
        if st is None:
            continue
        fields = st.rsplit(")", 1)[1].split()
        state = fields[0]
        out[f"thread.{tid}.state"] = "stopped" if state in "tT" else ("zombie" if state in "ZX" else "running")
        # scheduling is per thread (setpriority/sched_setscheduler take a TID)
        for name in _THREAD_STAT:
            out[f"thread.{tid}.{name}"] = fields[_STAT_FIELDS[name] - 3]
        for line in (_read(f"{tb}/status") or "").splitlines():
            key, _, val = line.partition(":")
            if key in _THREAD_STATUS:
                out[f"thread.{tid}.{key}"] = " ".join(val.split())
        for name in ("personality", "timerslack_ns"):
            text = _read(f"{tb}/{name}")
            if text is not None:
                out[f"thread.{tid}.{name}"] = text.strip()
        prio = _ioprio(int(tid))
        if prio is not None:
            out[f"thread.{tid}.ioprio"] = prio
        robust = _robust_list(int(tid))
        if robust is not None:
            out[f"thread.{tid}.robust_list"] = robust
    try:
        # Who owns the process's /proc files: its own uid while dumpable,
        # root otherwise (a restore that changes credentials resets it).
        st = os.stat(f"{base}/environ")
        out["proc_owner"] = f"{st.st_uid}:{st.st_gid}"
    except OSError:
        pass
    return out


GET_ROBUST_LIST_NR = {"x86_64": 274, "aarch64": 100}


def _robust_list(tid: int) -> Optional[str]:
    """get_robust_list(2) of another thread (head address and length: where
    the kernel looks for the futexes it must release when the thread dies;
    libc registers one per thread). "head/len", or None."""
    import ctypes
    nr = GET_ROBUST_LIST_NR.get(os.uname().machine)
    if nr is None:
        return None
    head, size = ctypes.c_void_p(), ctypes.c_size_t()
    if _libc().syscall(ctypes.c_long(nr), ctypes.c_int(tid), ctypes.byref(head), ctypes.byref(size)) != 0:
        return None
    return f"{head.value or 0:#x}/{size.value}"


def _ioprio(tid: int) -> Optional[str]:
    """ioprio_get(IOPRIO_WHO_PROCESS, tid): per thread (its io_context)."""
    try:
        from . import sysapi
    except ImportError:  # pragma: no cover - in the guest, a top-level module beside this one
        import sysapi  # type: ignore[no-redef]
    try:
        return str(sysapi.ioprio_get(tid))
    except (OSError, KeyError):     # gone, or a machine sysapi has no number for
        return None


def snapshot(pid: int, pub: Optional[dict] = None) -> Dict[str, str]:
    """One flat dict of everything /proc/PID says; ``{}`` if PID is gone."""
    base = f"/proc/{pid}"
    stat = _read(f"{base}/stat")
    if stat is None:
        return {}
    # the machine's: open flags' numbers differ between architectures (statediff)
    out: Dict[str, str] = {"arch": os.uname().machine}
    fields = stat.rsplit(")", 1)[1].split()     # after the last ')': comm may hold spaces
    for name, num in _STAT_FIELDS.items():
        if num - 3 < len(fields):
            out[f"stat.{name}"] = fields[num - 3]
    out["stat.state"] = "stopped" if fields[0] in "tT" else ("zombie" if fields[0] in "ZX" else "running")
    for line in (_read(f"{base}/status") or "").splitlines():
        key, _, val = line.partition(":")
        if key and key not in _STATUS_SKIP:
            out[f"status.{key}"] = " ".join(val.split())
    for name in ("limits", "personality", "timerslack_ns", "oom_score_adj", "timers", "cgroup", "cmdline",
                 "environ", "comm", "coredump_filter", "loginuid", "sessionid", "setgroups", "uid_map", "gid_map",
                 "mountinfo", "sched_autogroup"):
        # sched_autogroup: the kernel's file is /proc/PID/autogroup (sched(7))
        text = _read(f"{base}/{'autogroup' if name == 'sched_autogroup' else name}")
        if text is None:
            continue
        if name == "limits":
            for line in text.splitlines()[1:]:
                out[f"limits.{line[:26].strip()}"] = " ".join(line[26:].split())
        elif name in ("cmdline", "environ"):
            out[name] = text.replace("\0", " ").strip()
        elif name == "timers":
            out[name] = " | ".join(" ".join(ln.split()) for ln in text.splitlines())
        else:
            out[name] = " ".join(text.split())
    auxv = _read(f"{base}/auxv", binary=True)
    if auxv is not None:
        out["auxv"] = auxv
    for name in ("cwd", "root", "exe"):
        out[name] = _link(f"{base}/{name}") or "?"
    try:
        for ns in sorted(os.listdir(f"{base}/ns")):
            out[f"ns.{ns}"] = _link(f"{base}/ns/{ns}") or "?"
    except OSError:
        pass
    try:
        out["tids"] = " ".join(sorted(os.listdir(f"{base}/task"), key=int))
    except OSError:
        pass
    out.update(_threads(base))
    for i, line in enumerate((_read(f"{base}/maps") or "").splitlines()):
        # range perms offset dev inode path: each its own field, so a diff names which
        parts = line.split(None, 5)
        key = f"maps.{parts[0]}"
        out[key + ".perms"] = parts[1]
        out[key + ".offset"] = parts[2]
        out[key + ".dev"] = parts[3]
        out[key + ".inode"] = parts[4]
        out[key + ".path"] = parts[5].strip() if len(parts) > 5 else ""
    out.update(_advice(base))
    out.update(_numa_policies(base))
    out.update(_fds(base))
    for k, v in proof(pid, pub).items():
        out[f"proof.{k}"] = v if v is not None else "unreadable"
    return out


#: smaps VmFlags a process sets with madvise(2) and keeps: don't fork, don't
#: dump, wipe on fork, (no) huge pages. The others follow from the mapping's
#: protection and kind (compared through maps) or are the kernel's (sd, ac).
ADVICE = ("dc", "dd", "wf", "hg", "nh")


def _advice(base: str) -> Dict[str, str]:
    """maps.RANGE.advice: the madvise advice of each mapping that has any."""
    out: Dict[str, str] = {}
    rng = None
    for line in (_read(f"{base}/smaps") or "").splitlines():
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and ":" not in head:
            rng = head
        elif head == "VmFlags:" and rng:
            got = [f for f in line.split()[1:] if f in ADVICE]
            if got:
                out[f"maps.{rng}.advice"] = " ".join(sorted(got))
    return out


_MPOL = re.compile(r"((?:prefer \(many\)|weighted interleave)?\S*)")


def _numa_policies(base: str) -> Dict[str, str]:
    """The NUMA policies numa_maps shows (a mapping's own, else the
    process's: numactl's --interleave shows on every mapping) other than
    the default, as one sorted set: a restore may split or merge mappings
    differently (merge_neighbours), the policies they show are the same. A
    process without any policy adds no key."""
    seen = set()
    for line in (_read(f"{base}/numa_maps") or "").splitlines():
        m = _MPOL.match(line.partition(" ")[2])
        if m and m.group(1) != "default":
            seen.add(m.group(1))
    return {"numa_policies": " ".join(sorted(seen))} if seen else {}


# Socket options only the process changes (name, level, option, size): not
# the buffer sizes the kernel tunes by itself, unless locked (SO_BUF_LOCK).
_SOCKOPTS = (("SO_REUSEADDR", 1, 2, 4), ("SO_DONTROUTE", 1, 5, 4), ("SO_BROADCAST", 1, 6, 4),
             ("SO_KEEPALIVE", 1, 9, 4), ("SO_OOBINLINE", 1, 10, 4), ("SO_PRIORITY", 1, 12, 4),
             ("SO_LINGER", 1, 13, 8), ("SO_REUSEPORT", 1, 15, 4), ("SO_RCVLOWAT", 1, 18, 4),
             ("SO_RCVTIMEO", 1, 20, 16), ("SO_SNDTIMEO", 1, 21, 16), ("SO_TIMESTAMP", 1, 29, 4),
             ("SO_MARK", 1, 36, 4), ("SO_BUF_LOCK", 1, 72, 4),
             ("TCP_NODELAY", 6, 1, 4), ("TCP_KEEPIDLE", 6, 4, 4), ("TCP_KEEPINTVL", 6, 5, 4),
             ("TCP_KEEPCNT", 6, 6, 4), ("TCP_CONGESTION", 6, 13, 16), ("TCP_USER_TIMEOUT", 6, 18, 4),
             ("TCP_NOTSENT_LOWAT", 6, 25, 4), ("IP_TOS", 0, 1, 4), ("IP_TTL", 0, 2, 4),
             ("IPV6_UNICAST_HOPS", 41, 16, 4), ("IPV6_V6ONLY", 41, 26, 4), ("IPV6_TCLASS", 41, 67, 4))
_BUF_LOCKED = (("SO_SNDBUF", 7, 1), ("SO_RCVBUF", 8, 2))     # (name, option, SOCK_*BUF_LOCK bit)
PIDFD_GETFD = 438           # the same number on x86_64 and aarch64


_LIBC = []


def _libc():
    if not _LIBC:
        import ctypes
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def _sockopts(pidfd: int, fd: int) -> Dict[str, str]:
    """The options of the process's socket ``fd``, read from a duplicate
    (pidfd_getfd: the same open socket; getsockopt changes nothing). An
    option the socket's family or protocol has not is left out."""
    import socket
    dup = _libc().syscall(PIDFD_GETFD, pidfd, fd, 0)
    if dup < 0:
        return {}
    out: Dict[str, str] = {}
    try:
        s = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return {}
    try:
        for name, level, opt, size in _SOCKOPTS:
            try:
                out[f"sockopt.{name}"] = s.getsockopt(level, opt, size).hex()
            except OSError:
                pass
        lock = int.from_bytes(bytes.fromhex(out.get("sockopt.SO_BUF_LOCK", "00")), "little")
        for name, opt, bit in _BUF_LOCKED:
            if lock & bit:
                out[f"sockopt.{name}"] = s.getsockopt(1, opt, 4).hex()
    finally:
        s.close()
    return out


def _fds(base: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    try:
        fds = sorted(int(x) for x in os.listdir(f"{base}/fd"))
    except OSError:
        return out
    pidfd = -1
    for fd in fds:
        link = _link(f"{base}/fd/{fd}")
        if link is None:
            continue
        out[f"fd.{fd}.link"] = link
        if link.startswith("socket:"):
            if pidfd < 0:
                try:
                    pidfd = os.pidfd_open(int(base.rsplit("/", 1)[1]))
                except (OSError, AttributeError):
                    pidfd = -2          # gone, or a kernel without pidfds: no options read
            if pidfd >= 0:
                out.update({f"fd.{fd}.{k}": v for k, v in _sockopts(pidfd, fd).items()})
        info = _read(f"{base}/fdinfo/{fd}") or ""
        counts: Dict[str, int] = {}
        for line in info.splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if not key:
                continue
            val = " ".join(val.split())
            item = _ITEM.match(line)
            if item:
                # one line per epoll target / inotify watch / fanotify mark, in the
                # kernel's internal order: key each by what names it
                kind, name, rest = item.group(1), item.group(2), item.group(3)
                fields = dict(f.split(":", 1) for f in rest.split() if ":" in f)
                for k, v in fields.items():
                    out[f"fd.{fd}.fdinfo.{kind}.{name}.{k}"] = v
                continue
            # other repeated keys get an index
            n = counts.get(key, 0)
            counts[key] = n + 1
            out[f"fd.{fd}.fdinfo.{key}" + (f".{n}" if n else "")] = val
    if pidfd >= 0:
        os.close(pidfd)
    shared = _fd_sharing(int(base.rsplit("/", 1)[1]), [fd for fd in fds if f"fd.{fd}.link" in out])
    if shared is not None:
        out["fd_sharing"] = shared
    return out


KCMP_NR = {"x86_64": 312, "aarch64": 272}
KCMP_FILE = 0


def _fd_sharing(pid: int, fds) -> Optional[str]:
    """Which fds share one open file description (kcmp KCMP_FILE), as
    groups: "1=2 5=6=9"; every fd, not only a scenario's (its stdout and
    stderr, say). None on an architecture this does not know."""
    nr = KCMP_NR.get(os.uname().machine)
    if nr is None:
        return None
    call = _libc().syscall
    groups = []
    for fd in fds:
        for g in groups:
            r = call(nr, pid, pid, KCMP_FILE, fd, g[0])
            if r < 0:       # closed meanwhile (EBADF), or no kcmp at all (then no fd is in a group)
                break
            if r == 0:
                g.append(fd)
                break
        else:
            groups.append([fd])
    return " ".join("=".join(str(fd) for fd in g) for g in groups if len(g) > 1)


def anon_object(link: str) -> Optional[str]:
    """``pipe:[123]`` -> ``pipe``: the kind of a kernel-internal object whose
    number is handed out at creation (so a restore gets a new one)."""
    m = _ANON_NUM.match(link)
    return m.group(1) if m else None
