"""Scheduling attributes: policy, priority, nice, flags, utilisation clamps
(sched_getattr), CPU affinity, oom_score_adj and timer slack.

All are read from outside (syscalls taking a pid, /proc files) and applied
to the new process from the restorer once it is rebuilt. The new process is
a clone3 of the restorer, so without this it would carry ckpt's values.

What a program can see and how each comes back exactly:
* sched_getattr(2): policy, SCHED_FLAG_RESET_ON_FORK, nice, RT priority,
  deadline parameters, uclamp min/max. Set with sched_setattr(2); nice of an
  IDLE/RT/DL task is set first under SCHED_OTHER (sched_setattr ignores
  sched_nice for those policies but the task keeps its static priority).
* sched_getaffinity(2): the kernel silently narrows a mask to the CPUs the
  cpuset allows, so the mask is checked before the process exists and read
  back after; a mask this machine cannot honour is refused (`sched`).
* /proc/PID/oom_score_adj: lowering it below the restorer's floor
  (oom_score_adj_min) needs CAP_SYS_RESOURCE; refused up front otherwise.
* the I/O priority (ioprio_get/ioprio_set, IOPRIO_WHO_PROCESS: per thread,
  as its io_context is; `ionice`): set after nice, from which the kernel
  derives the priority of a task without a class of its own, then read back.
* timer slack (PR_GET_TIMERSLACK) and the default it returns to on
  PR_SET_TIMERSLACK(0): fork copies the parent's *current* slack into the
  child's default, so the restorer sets its own slack to the dumped default
  just before clone3. The default is read by writing 0 to
  /proc/PID/timerslack_ns (which resets to the default) and writing the
  value back, while the target is frozen.
"""

from __future__ import annotations

import ctypes
import os
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List

from . import libc
from .arch import current as current_arch
from .errors import Refusal
from .procfs import self_memo as procfs_memo

SCHED_NORMAL, SCHED_FIFO, SCHED_RR, SCHED_BATCH, SCHED_IDLE, SCHED_DEADLINE = 0, 1, 2, 3, 5, 6
SCHED_FLAG_RESET_ON_FORK = 0x01
SCHED_FLAG_UTIL_CLAMP_MIN, SCHED_FLAG_UTIL_CLAMP_MAX = 0x20, 0x40
# struct sched_attr (include/uapi/linux/sched/types.h), SCHED_ATTR_SIZE_VER1
ATTR = struct.Struct("<IIQiIQQQII")
FIELDS = ("size", "policy", "flags", "nice", "priority", "runtime", "deadline", "period",
          "util_min", "util_max")
PR_SET_TIMERSLACK = 29
RT_POLICIES = (SCHED_FIFO, SCHED_RR, SCHED_DEADLINE)
NICE_POLICIES = (SCHED_NORMAL, SCHED_BATCH)   # sched_setattr sets sched_nice only for these
CAP_SYS_ADMIN, CAP_SYS_NICE, CAP_SYS_RESOURCE = 21, 23, 24
IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_RT = 1
IOPRIO_CLASS_SHIFT = 13


_GETATTR: list = []


def get_attr(pid: int) -> dict:
    # syscall(2) with its argument types bound once, into one reused
    # buffer: asked for every task at the dump and up to three times at
    # the restore (libc.syscall's generic argument handling was most of it)
    if not _GETATTR:
        call = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint,
                                ctypes.c_uint, use_errno=True)(("syscall", ctypes.CDLL(None, use_errno=True)))
        buf = ctypes.create_string_buffer(ATTR.size)
        _GETATTR.extend((call, current_arch().SYS["sched_getattr"], buf, ctypes.addressof(buf)))
    call, nr, buf, addr = _GETATTR
    if call(nr, pid, addr, ATTR.size, 0) < 0:
        raise libc.SysError("sched_getattr", ctypes.get_errno(), pid)
    d = dict(zip(FIELDS, ATTR.unpack(buf.raw)))
    d.pop("size")
    return d


def set_attr(pid: int, attr: dict) -> None:
    vals = dict(attr, size=ATTR.size)
    buf = ctypes.create_string_buffer(ATTR.pack(*(vals[f] for f in FIELDS)), ATTR.size)
    libc.syscall(current_arch().SYS["sched_setattr"], pid, buf, 0, name="sched_setattr", pid=pid)


def _read_int(path: str) -> int:
    # os.open/os.read, not open(): no text-file object for a one-number file
    # (five of these per task and dump, four per task and restore)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return int(os.read(fd, 64).strip())
    finally:
        os.close(fd)


def _write_int(path: str, value: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, f"{value}\n".encode())
    finally:
        os.close(fd)


def _reread_int(fd: int) -> int:
    os.lseek(fd, 0, os.SEEK_SET)       # a seq_file shows the value afresh from offset 0
    return int(os.read(fd, 64).strip())


def _slack_and_default(path: str, rt: bool):
    """(timer slack, default slack or None) through one descriptor: read,
    write 0 (the task's default), read, write the value back."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        fd = None
    if fd is None:      # not writable here: as far as the separate opens get
        slack = _read_int(path)
        if not rt:
            try:
                _write_int(path, 0)
            except OSError:
                return slack, None
            try:
                return slack, _read_int(path)
            finally:
                _write_int(path, slack)
        return slack, None
    try:
        slack = _reread_int(fd)
        if rt:
            return slack, None
        try:
            os.write(fd, b"0\n")
        except OSError:
            return slack, None  # not allowed (no CAP_SYS_NICE): the default stays unknown, ckpt's
        try:
            return slack, _reread_int(fd)
        finally:
            os.write(fd, f"{slack}\n".encode())
    finally:
        os.close(fd)


def dump(pid: int) -> dict:
    """The scheduling record of a frozen process."""
    attr = get_attr(pid)
    # Writing 0 sets the slack to the task's default; put it back at once
    # (the target is frozen: nothing of it runs in between).
    slack, default = _slack_and_default(f"/proc/{pid}/timerslack_ns", attr["policy"] in RT_POLICIES)
    # sched_getattr reports sched_nice 0 for RT tasks; their nice (what
    # getpriority shows, and what a return to SCHED_OTHER brings back) is kept.
    return {"attr": attr, "nice": os.getpriority(os.PRIO_PROCESS, pid), "affinity": sorted(os.sched_getaffinity(pid)),
            "oom_score_adj": _read_int(f"/proc/{pid}/oom_score_adj"),
            "timerslack_ns": slack, "default_timerslack_ns": default, "ioprio": get_ioprio(pid)}


def get_ioprio(pid: int) -> int:
    return libc.syscall(current_arch().SYS["ioprio_get"], IOPRIO_WHO_PROCESS, pid, name="ioprio_get", pid=pid)


def _ioprio_text(v: int) -> str:
    cls = v >> IOPRIO_CLASS_SHIFT
    return {0: "none", 1: "realtime", 2: "best-effort", 3: "idle"}.get(cls, f"class {cls}") + \
        (f" {v & 0xff}" if cls in (1, 2) else "")


def describe(rec: dict) -> str:
    a = rec["attr"]
    names = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE",
             6: "SCHED_DEADLINE"}
    pol = names.get(a["policy"], str(a["policy"]))
    if a["flags"] & SCHED_FLAG_RESET_ON_FORK:
        pol += "|RESET_ON_FORK"
    return (f"{pol} nice {rec['nice']} prio {a['priority']}, cpus {cpu_list(rec['affinity'])}, "
            f"oom_score_adj {rec['oom_score_adj']}, timer slack {rec['timerslack_ns']} ns"
            + (f", I/O {_ioprio_text(rec['ioprio'])}" if rec.get("ioprio") else ""))


def cpu_list(cpus: List[int]) -> str:
    out, i = [], 0
    cpus = sorted(cpus)
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def parse_cpu_list(text: str) -> List[int]:
    cpus: List[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


_MINE: dict = procfs_memo({})     # (pid, what) -> ckpt's own value, read once (a tree's pre-flight asks per member)


def _mine(what: str, read):
    key = (os.getpid(), what)
    if key not in _MINE:
        _MINE[key] = read()
    return _MINE[key]


def allowed_cpus() -> List[int]:
    """The CPUs a process created here may be bound to: the restorer's
    cgroup's effective cpuset (cgroup v2), else every online CPU. Read
    once per process: the pre-flight's view (apply() reads the mask back)."""
    return list(_mine("cpus", _allowed_cpus))


def _allowed_cpus() -> List[int]:
    from .procfs import read_all     # no text file objects: half the syscalls
    try:
        for line in read_all("/proc/self/cgroup").decode("utf-8", "surrogateescape").splitlines():
            if line.startswith("0::"):
                path = "/sys/fs/cgroup" + line[3:].strip()
                return parse_cpu_list(read_all(os.path.join(path, "cpuset.cpus.effective")).decode())
    except OSError:
        pass
    return parse_cpu_list(read_all("/sys/devices/system/cpu/online").decode())


def _my_caps() -> int:
    from .procfs import self_status
    eff = self_status().get("CapEff")
    return int(eff.split()[0], 16) if eff else 0


def validate(rec: dict) -> List[Refusal]:
    """What can be refused before the process exists."""
    out = []
    bad = sorted(set(rec["affinity"]) - set(allowed_cpus()))
    if bad:
        out.append(Refusal("sched", f"CPU affinity {cpu_list(rec['affinity'])}: CPUs {cpu_list(bad)} are not "
                           f"available here (allowed {cpu_list(allowed_cpus())})"))
    if not (_my_caps() >> CAP_SYS_NICE) & 1:
        # Without it the restorer could only make the clone's scheduling
        # weaker, never RT or nicer than its own.
        mynice = os.getpriority(os.PRIO_PROCESS, 0)
        if rec["attr"]["policy"] in RT_POLICIES or rec["nice"] < mynice:
            out.append(Refusal("capability", f"{describe(rec)}: setting it needs CAP_SYS_NICE"))
    if (rec.get("ioprio", 0) >> IOPRIO_CLASS_SHIFT) == IOPRIO_CLASS_RT and not (_my_caps() >> CAP_SYS_ADMIN) & 1:
        out.append(Refusal("capability", f"I/O priority {_ioprio_text(rec['ioprio'])}: setting it needs CAP_SYS_ADMIN"))
    mine = _mine("oom_score_adj", lambda: _read_int("/proc/self/oom_score_adj"))
    if rec["oom_score_adj"] < mine and not (_my_caps() >> CAP_SYS_RESOURCE) & 1:
        out.append(Refusal("capability", f"oom_score_adj {rec['oom_score_adj']} is below ckpt's {mine}; "
                           "lowering it needs CAP_SYS_RESOURCE"))
    return out


def before_clone(rec: dict) -> None:
    """In the restorer, just before clone3: the child's default timer slack
    is the parent's current one (kernel/fork.c copy_process)."""
    default = rec.get("default_timerslack_ns")
    if default:
        libc.syscall(current_arch().SYS["prctl"], PR_SET_TIMERSLACK, default, 0, 0, 0, name="prctl(PR_SET_TIMERSLACK)")


def apply(pid: int, rec: dict) -> None:
    """Give the new process `pid` the dumped attributes and read each one
    back. Raises Refusal(sched) when the kernel applied something else."""
    want = dict(rec["attr"])
    now = get_attr(pid)
    if now != want or os.getpriority(os.PRIO_PROCESS, pid) != rec["nice"]:
        uclamp = 0
        if (want["util_min"], want["util_max"]) != (now["util_min"], now["util_max"]):
            uclamp = SCHED_FLAG_UTIL_CLAMP_MIN | SCHED_FLAG_UTIL_CLAMP_MAX
        try:
            if want["policy"] not in NICE_POLICIES:
                set_attr(pid, dict(now, policy=SCHED_NORMAL, flags=0, priority=0, nice=rec["nice"],
                                   runtime=0, deadline=0, period=0))
            # A fair task's runtime is its EEVDF slice (6.12+): passing the
            # default value would mark it custom; 0 keeps the default.
            runtime = want["runtime"]
            if want["policy"] not in RT_POLICIES and runtime == now["runtime"]:
                runtime = 0
            set_attr(pid, dict(want, flags=want["flags"] | uclamp, runtime=runtime))
        except libc.SysError as e:
            code = "capability" if e.errno == 1 else "sched"
            raise Refusal(code, f"sched_setattr {describe(rec)}: {e.message}", pid=pid) from None
        got = get_attr(pid)
        if got != want or os.getpriority(os.PRIO_PROCESS, pid) != rec["nice"]:
            raise Refusal("sched", f"sched_setattr gave {got}, not {want}", pid=pid)
    cpus = set(rec["affinity"])
    try:
        os.sched_setaffinity(pid, cpus)
    except OSError as e:
        raise Refusal("sched", f"CPU affinity {cpu_list(rec['affinity'])}: {e.strerror}", pid=pid) from None
    got_cpus = os.sched_getaffinity(pid)
    if got_cpus != cpus:
        raise Refusal("sched", f"CPU affinity {cpu_list(rec['affinity'])} became {cpu_list(list(got_cpus))}", pid=pid)
    _apply_ioprio(pid, rec)
    try:
        got_adj = _write_and_reread(f"/proc/{pid}/oom_score_adj", rec["oom_score_adj"])
    except OSError as e:
        raise Refusal("capability", f"oom_score_adj {rec['oom_score_adj']}: {e.strerror}", pid=pid) from None
    # After the policy: a change of policy resets the slack (RT tasks have none).
    got_slack = _write_and_reread(f"/proc/{pid}/timerslack_ns", rec["timerslack_ns"])
    if (got_adj, got_slack) != (rec["oom_score_adj"], rec["timerslack_ns"]):
        raise Refusal("sched", f"oom_score_adj/timer slack read back as {got_adj}/{got_slack}", pid=pid)


def _write_and_reread(path: str, value: int) -> int:
    """Write `value`, then read what the file shows, through one
    descriptor (a separate open each was twice the calls). Raises OSError."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.write(fd, f"{value}\n".encode())
        return _reread_int(fd)
    finally:
        os.close(fd)


def _apply_ioprio(pid: int, rec: dict) -> None:
    want = rec.get("ioprio")
    if want is None or get_ioprio(pid) == want:
        return
    try:
        libc.syscall(current_arch().SYS["ioprio_set"], IOPRIO_WHO_PROCESS, pid, want, name="ioprio_set", pid=pid)
    except libc.SysError as e:
        code = "capability" if e.errno == 1 else "sched"
        raise Refusal(code, f"I/O priority {_ioprio_text(want)}: {e.message}", pid=pid) from None
    got = get_ioprio(pid)
    if got != want:
        raise Refusal("sched", f"I/O priority {_ioprio_text(want)} became {_ioprio_text(got)}", pid=pid)


def check_record(rec) -> bool:
    """Structure of the core.json "sched" record (restore's check_core)."""
    try:
        ints = [rec["attr"][f] for f in FIELDS[1:]] + [rec["nice"], rec["oom_score_adj"], rec["timerslack_ns"]]
        ints += list(rec["affinity"])
        for k in ("default_timerslack_ns", "ioprio"):
            if rec.get(k) is not None:
                ints.append(rec[k])
        return bool(rec["affinity"]) and all(isinstance(x, int) and not isinstance(x, bool) for x in ints)
    except (KeyError, TypeError):
        return False
