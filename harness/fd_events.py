"""fd kinds that deliver events or hold counters: inotify, dnotify,
fanotify, eventfd, timerfd, signalfd, epoll.

Runs in the guest (stdlib only, Python >= 3.9). State is read back the way
the kernel shows it (fdinfo, proc(5)) and exercised: an event the workload
triggers itself must arrive on the same wd, a raised signal must come out of
the signalfd, and so on.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import stat
import struct
import time
from typing import List, Optional

try:
    from . import sysapi
    from .fdcore import (EPOLL_EVENTS, FD_FLAGS, Ctx, Opened, check, drain, fdinfo, flag_bits,
                         wait_readable)
except ImportError:  # pragma: no cover - in the guest, run as a script
    import sysapi  # type: ignore[no-redef]
    from fdcore import (EPOLL_EVENTS, FD_FLAGS, Ctx, Opened, check, drain, fdinfo, flag_bits,
                         wait_readable)  # type: ignore[no-redef]


def inotify_fdinfo(fd: int) -> List[dict]:
    """Watches as fdinfo shows them (proc(5): ``inotify wd:%x ino:%lx sdev:%x mask:%x ...``)."""
    out = []
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("inotify "):
                kv = dict(p.split(":", 1) for p in line.split()[1:] if ":" in p)
                out.append({"wd": int(kv["wd"], 16), "ino": int(kv["ino"], 16), "mask": int(kv["mask"], 16)})
    return sorted(out, key=lambda w: w["wd"])


def open_inotify(e: dict, ctx: Ctx) -> List[Opened]:
    spec = e["inotify"]
    fd = sysapi.inotify_init1(flag_bits(spec.get("flags"), FD_FLAGS))
    wds = []
    for w in spec.get("watches", []):
        mask = sysapi.names_to_mask(w["mask"], sysapi.IN_FLAGS)
        wd = sysapi.inotify_add_watch(fd, w["path"], mask)
        if w.get("remove"):
            sysapi.inotify_rm_watch(fd, wd)
            # rm_watch queues IN_IGNORED; read it so the queue is empty
            drain(fd)
        else:
            wds.append({"path": w["path"], "wd": wd, "mask": mask, "ino": ctx.model.lookup(w["path"])})
    return [Opened(fd, int(e["fd"]), "inotify", {"watches": wds})]


def _trigger(path: str, mask: int, ctx: Ctx) -> Optional[int]:
    """Cause one event the watch on ``path`` reports; returns its bit."""
    isdir = os.path.isdir(path)
    if mask & sysapi.IN_FLAGS["IN_ATTRIB"]:
        os.chmod(path, stat.S_IMODE(os.stat(path).st_mode))
        return sysapi.IN_FLAGS["IN_ATTRIB"]
    if isdir and mask & sysapi.IN_FLAGS["IN_CREATE"]:
        tmp = os.path.join(path, ".crucible-trigger")
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
        os.unlink(tmp)
        return sysapi.IN_FLAGS["IN_CREATE"]
    if mask & sysapi.IN_FLAGS["IN_OPEN"]:
        os.close(os.open(path, os.O_RDONLY))
        return sysapi.IN_FLAGS["IN_OPEN"]
    if not isdir and mask & (sysapi.IN_FLAGS["IN_MODIFY"] | sysapi.IN_FLAGS["IN_CLOSE_WRITE"]):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"!")
        os.close(fd)
        return mask & (sysapi.IN_FLAGS["IN_MODIFY"] | sysapi.IN_FLAGS["IN_CLOSE_WRITE"])
    return None


def check_inotify(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    rec = recs[0]
    fd = rec["fd"]
    # a watch follows its inode: find the inode's name now (it may have been renamed)
    watches = [dict(w, path=ctx.model.path_of(w["ino"])) for w in rec["extra"]["watches"]]
    out = []
    if phase == "inspect":
        # Events the scenario's before_dump steps cause stay queued (the
        # scenario lists them as `pending`); an IN_IGNORED one means its watch is gone.
        queued = sysapi.parse_inotify_events(drain(fd))
        names = {v: k for k, v in sysapi.IN_FLAGS.items()}
        names[sysapi.IN_IGNORED] = "IN_IGNORED"
        got_pending = ["|".join(n for b, n in sorted(names.items()) if x[1] & b) for x in queued]
        out.append(check(fd, "queued events (kinds, in order)", list(e["inotify"].get("pending", [])), got_pending))
        gone = {x[0] for x in queued if x[1] & sysapi.IN_IGNORED}
        watches = [w for w in watches if w["wd"] not in gone]
        now = inotify_fdinfo(fd)
        out.append(check(fd, "watches (wd, mask)", [(w["wd"], w["mask"]) for w in rec["extra"]["fdinfo"]
                                                    if w["wd"] not in gone],
                         [(w["wd"], w["mask"]) for w in now]))
        for w in now:
            path = next((x["path"] for x in watches if x["wd"] == w["wd"]), None)
            if path is not None and os.path.lexists(path):
                out.append(check(fd, f"wd {w['wd']} watches the inode at {path}", os.stat(path).st_ino, w["ino"]))
        for w in watches:
            if w["path"] is None:
                continue
            try:
                again = sysapi.inotify_add_watch(fd, w["path"], w["mask"] | sysapi.IN_MASK_ADD)
            except OSError as err:
                again = f"error {err.errno}"
            out.append(check(fd, f"re-adding {w['path']} returns the same wd", w["wd"], again))
    elif phase == "mutate":
        for w in watches:
            if w["path"] is None or not os.path.lexists(w["path"]):
                continue
            bit = _trigger(w["path"], w["mask"], ctx)
            if bit is None:
                continue
            got = []
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not any(x[0] == w["wd"] and x[1] & bit for x in got):
                if wait_readable(fd, 0.2):
                    got += sysapi.parse_inotify_events(os.read(fd, 65536))
            out.append({"fd": fd, "what": f"event on wd {w['wd']} ({w['path']})", "expected": f"mask & {bit:#x}",
                        "got": [(x[0], hex(x[1])) for x in got],
                        "ok": any(x[0] == w["wd"] and x[1] & bit for x in got)})
    return out


def open_dnotify(e: dict, ctx: Ctx) -> List[Opened]:
    return [Opened(os.open(e["dnotify"], os.O_RDONLY | os.O_DIRECTORY), int(e["fd"]), "dnotify")]


def finish_dnotify(e: dict, fd: int) -> None:
    """F_NOTIFY on the fd's final number: closing *any* fd of the same open
    file removes the registration (fs/notify/dnotify/dnotify.c, dnotify_flush
    on filp_close), so it must not be set on the temporary fd."""
    mask = sysapi.names_to_mask(e.get("mask", ["DN_CREATE"]), sysapi.DN_FLAGS) | sysapi.DN_FLAGS["DN_MULTISHOT"]
    fcntl.fcntl(fd, sysapi.F_NOTIFY, mask)


def check_dnotify(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd = recs[0]["fd"]
    if phase != "mutate":
        return []
    before = ctx.sigio[0]
    tmp = os.path.join(e["dnotify"], ".crucible-dnotify")
    os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    os.unlink(tmp)
    deadline = time.monotonic() + 2
    while ctx.sigio[0] == before and time.monotonic() < deadline:
        time.sleep(0.02)
    return [check(fd, "SIGIO on a create in the directory", True, ctx.sigio[0] > before)]


def open_fanotify(e: dict, ctx: Ctx) -> List[Opened]:
    spec = e["fanotify"]
    fd = sysapi.fanotify_init(sysapi.FAN_CLASS_NOTIF | sysapi.FAN_NONBLOCK, os.O_RDONLY)
    sysapi.fanotify_mark(fd, sysapi.FAN_MARK_ADD, sysapi.names_to_mask(spec.get("mask", ["FAN_OPEN"]),
                                                                        sysapi.FAN_FLAGS), spec["mark"])
    return [Opened(fd, int(e["fd"]), "fanotify")]


def check_fanotify(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd = recs[0]["fd"]
    if phase != "mutate":
        return []
    os.close(os.open(e["fanotify"]["mark"], os.O_RDONLY))
    got = []
    if wait_readable(fd, 2):
        buf = os.read(fd, 4096)
        off = 0
        while off + 24 <= len(buf):   # struct fanotify_event_metadata (fanotify(7))
            ln, _v, _r, _ml, mask, efd, pid = struct.unpack_from("IBBHQii", buf, off)
            got.append(mask)
            if efd >= 0:
                os.close(efd)
            off += ln or 24
    return [check(fd, "FAN_OPEN event", True, any(m & sysapi.FAN_FLAGS["FAN_OPEN"] for m in got))]


def open_eventfd(e: dict, ctx: Ctx) -> List[Opened]:
    spec = e["eventfd"]
    flags = flag_bits([f for f in spec.get("flags", []) if f != "EFD_SEMAPHORE"], FD_FLAGS)
    if "EFD_SEMAPHORE" in spec.get("flags", []):
        flags |= sysapi.EFD_SEMAPHORE
    fd = sysapi.eventfd(int(spec.get("initval", 0)), flags)
    if spec.get("add"):
        os.write(fd, struct.pack("Q", int(spec["add"])))
    return [Opened(fd, int(e["fd"]), "eventfd")]


def check_eventfd(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd, spec = recs[0]["fd"], e["eventfd"]
    count = int(spec.get("initval", 0)) + int(spec.get("add", 0))
    if phase == "inspect":
        return [check(fd, "eventfd-count", count, int(fdinfo(fd).get("eventfd-count", "-1"), 16))]
    if phase == "consume" and count:
        semaphore = "EFD_SEMAPHORE" in spec.get("flags", [])
        # never block: a restored counter of 0 would hang a blocking read
        got = struct.unpack("Q", os.read(fd, 8))[0] if wait_readable(fd, 0) else "not readable"
        return [check(fd, "read() value", 1 if semaphore else count, got)]
    return []


def open_timerfd(e: dict, ctx: Ctx) -> List[Opened]:
    spec = e["timerfd"]
    fd = sysapi.timerfd_create(sysapi.CLOCKS[spec.get("clock", "monotonic")], flag_bits(spec.get("flags"), FD_FLAGS))
    sysapi.timerfd_settime(fd, int(spec["value_ms"]), int(spec.get("interval_ms", 0)))
    return [Opened(fd, int(e["fd"]), "timerfd")]


def check_timerfd(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd, spec = recs[0]["fd"], e["timerfd"]
    if phase != "inspect":
        return []
    remaining, interval = sysapi.timerfd_gettime(fd)
    out = [check(fd, "clockid", sysapi.CLOCKS[spec.get("clock", "monotonic")], int(fdinfo(fd).get("clockid", "-1"))),
           check(fd, "interval (ms)", int(spec.get("interval_ms", 0)), round(interval * 1000))]
    if not spec.get("interval_ms"):
        out.append({"fd": fd, "what": "still armed", "expected": f"0 < remaining <= {spec['value_ms']} ms",
                    "got": round(remaining * 1000), "ok": 0 < remaining * 1000 <= int(spec["value_ms"])})
    else:
        out.append(check(fd, "periodic timer ticks", True, wait_readable(fd, 3 * int(spec["interval_ms"]) / 1000 + 1)))
    return out


def open_signalfd(e: dict, ctx: Ctx) -> List[Opened]:
    spec = e["signalfd"]
    sigs = [signal.Signals[s] for s in spec["signals"]]
    # signals read through a signalfd must be blocked (signalfd(2))
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    return [Opened(sysapi.signalfd(sigs, flag_bits(spec.get("flags"), FD_FLAGS)), int(e["fd"]), "signalfd")]


def check_signalfd(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd = recs[0]["fd"]
    sigs = sorted(int(signal.Signals[s]) for s in e["signalfd"]["signals"])
    mask = 0
    for s in sigs:
        mask |= 1 << (s - 1)
    if phase == "inspect":
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return [check(fd, "sigmask", f"{mask:016x}", fdinfo(fd).get("sigmask")),
                check(None, "signals still blocked", sigs, sorted(int(s) for s in blocked if int(s) in sigs))]
    if phase == "mutate":
        os.kill(os.getpid(), sigs[0])
        got = struct.unpack_from("I", os.read(fd, 128))[0] if wait_readable(fd, 2) else None
        return [check(fd, "signal read from signalfd", sigs[0], got)]
    return []


def open_epoll(e: dict, ctx: Ctx) -> List[Opened]:
    ep = select.epoll()
    for t in e["epoll"]["targets"]:
        ep.register(int(t["fd"]), sysapi.names_to_mask(t.get("events", ["EPOLLIN"]), EPOLL_EVENTS))
    # select.epoll has no detach(): keep a dup and close the object's own fd
    fd = os.dup(ep.fileno())
    ep.close()
    return [Opened(fd, int(e["fd"]), "epoll")]


def epoll_fdinfo(fd: int) -> List[list]:
    """``[tfd, events]`` per target (proc(5): ``tfd: %8d events: %8x data: ...``)."""
    out = []
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("tfd:"):
                parts = line.split()
                out.append([int(parts[1]), int(parts[3], 16)])
    return sorted(out)


def epoll_ready(fd: int) -> List[list]:
    ep = select.epoll.fromfd(os.dup(fd))
    try:
        return sorted([f, ev] for f, ev in ep.poll(0))
    finally:
        ep.close()


def check_epoll(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    rec = recs[0]
    fd = rec["fd"]
    if phase != "inspect":
        return []
    return [check(fd, "epoll targets (tfd, events)", rec["extra"]["targets"], epoll_fdinfo(fd)),
            check(fd, "epoll readiness", rec["extra"]["ready"], epoll_ready(fd))]
