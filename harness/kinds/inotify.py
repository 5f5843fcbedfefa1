"""``inotify``: an inotify instance with watches (same wds, masks, watched
inodes), optionally events left queued by before_dump steps (``pending``).
The checker reads the queue, re-adds each watch (must return the same wd)
and triggers one event per watch, which must arrive on that wd."""

from __future__ import annotations

import os
import stat
import time

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List, Optional

from .core import FD_FLAGS, Ctx, Opened, check, drain, flag_bits, wait_readable

try:
    from .. import sysapi
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import sysapi  # type: ignore[no-redef]

KIND = "inotify"
TAGS = ("inotify",)
IN_MASKS = ("IN_ACCESS", "IN_MODIFY", "IN_ATTRIB", "IN_CLOSE_WRITE", "IN_CLOSE_NOWRITE", "IN_OPEN",
            "IN_MOVED_FROM", "IN_MOVED_TO", "IN_CREATE", "IN_DELETE", "IN_DELETE_SELF", "IN_MOVE_SELF",
            "IN_ONLYDIR", "IN_DONT_FOLLOW", "IN_EXCL_UNLINK", "IN_ONESHOT")


def fields(s) -> dict:
    return {"inotify": s.Map({
        "flags": s.FdFlags("IN"), "pending": s.List_(s.Enum(IN_MASKS + ("IN_IGNORED",))),
        "watches": s.List_(s.Map({"path": s.Path(), "mask": s.List_(s.Enum(IN_MASKS)), "remove": s.Bool()},
                                 required=("path", "mask")))})}


def inotify_fdinfo(fd: int) -> List[dict]:
    """Watches as fdinfo shows them (proc(5): ``inotify wd:%x ino:%lx sdev:%x mask:%x ...``)."""
    out = []
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("inotify "):
                kv = dict(p.split(":", 1) for p in line.split()[1:] if ":" in p)
                out.append({"wd": int(kv["wd"], 16), "ino": int(kv["ino"], 16), "mask": int(kv["mask"], 16)})
    return sorted(out, key=lambda w: w["wd"])


def opener(e: dict, ctx: Ctx) -> List[Opened]:
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


def extras(rec: dict) -> None:
    rec["extra"]["fdinfo"] = inotify_fdinfo(rec["fd"])


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


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
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
