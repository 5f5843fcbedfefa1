"""``open``: a regular file opened by name (mode, flags, offset; ``count``
separate opens of one file, each its own open file description).

What a file fd must show comes from the seeded model of the scenario's world
(harness/world.py), never from the engine's image. Besides content, size and
offsets, a checker proves that separately opened fds on one file do NOT
share an offset, and a file deleted before the dump (a ghost) keeps its
mode (set-id and sticky bits included), owner, mtime and the name
/proc/PID/fd shows.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import (FULL_COMPARE_MAX, MARKER, MODES, OPEN_FLAGS, SAMPLE, Ctx, Opened, bytes_check, check,
                   flag_bits)

try:
    from .. import world
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import world  # type: ignore[no-redef]

KIND = "open"
TAGS = ("files",)


def fields(s) -> dict:
    return {"open": s.Path(), "mode": s.Enum(("r", "w", "rw", "a", "a+")),
            "flags": s.List_(s.Enum(tuple(OPEN_FLAGS))), "seek": s.Size(), "count": s.Int(1, 400),
            "seek_step": s.Size()}


def fd_numbers(e: dict) -> List[int]:
    return [e["fd"] + i for i in range(e.get("count", 1))]


def _stat_of(st: os.stat_result) -> dict:
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    flags = MODES[e.get("mode", "r")] | flag_bits(e.get("flags"), OPEN_FLAGS)
    ino = ctx.model.lookup(e["open"])
    node = ctx.model.nodes.get(ino)
    # the attributes as this process saw them, and how many steps had changed
    # each by then (world.Node.changes): the baseline of the ghost checks
    extra = {"ino": ino, "dentry": ctx.model.dentry(e["open"]),
             "changes": dict(node.changes) if node else {}}
    out = []
    for i in range(int(e.get("count", 1))):
        fd = os.open(e["open"], flags)
        os.lseek(fd, int(e.get("seek", 0)) + i * int(e.get("seek_step", 0)), os.SEEK_SET)
        out.append(Opened(fd, int(e["fd"]) + i, "file", dict(extra, stat=_stat_of(os.fstat(fd)))))
    return out


def _readable_fd(fd: int) -> int:
    """A read-only fd on the same file (a new open file description, through
    /proc/self/fd, which works for deleted files too; proc(5))."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)


def _ghost_checks(fd: int, rec: dict, ctx: Ctx) -> List[dict]:
    """A file with no name left: its attributes and the name /proc shows."""
    out = []
    extra = rec["extra"]
    node = ctx.model.nodes[extra["ino"]]
    st = _stat_of(os.fstat(fd))
    for attr in world.ATTRS:
        if node.changes[attr] == extra["changes"].get(attr, 0):
            want = extra["stat"][attr]            # no step changed it since the process looked
        elif node.known[attr] is not None:
            want = node.known[attr]               # a step set it exactly
            if attr == "mode":
                want |= stat.S_IFREG
        else:
            continue                              # changed to a value nobody can know
        got = st[attr]
        if attr == "mode":
            want, got = oct(want), oct(got)
        out.append(check(fd, f"ghost {attr}", want, got))
    if extra.get("dentry") is not None:
        name, dead = ctx.model.dentry_name(extra["dentry"])
        want = os.path.join(ctx.workdir, name) + (" (deleted)" if dead else "")
        out.append(check(fd, "ghost: name in /proc/self/fd", want, os.readlink(f"/proc/self/fd/{fd}")))
    return out


def _independence_checks(e: dict, recs: List[dict], ctx: Ctx) -> List[dict]:
    """Separately opened fds on one file have separate offsets: moving one
    must not move another (an engine that merged them into one open file
    description would fail here). Each fd of this entry against the next one
    and the first against every later ``open`` entry on the same inode."""
    pairs = list(zip(recs, recs[1:]))
    me = ctx.entries.index(e)
    for r in ctx.recs:
        if r["kind"] == KIND and r["entry"] > me and r["extra"]["ino"] == recs[0]["extra"]["ino"] \
                and r["extra"]["ino"] is not None:
            pairs.append((recs[0], r))
    out = []
    for a, b in pairs:
        pa, pb = os.lseek(a["fd"], 0, os.SEEK_CUR), os.lseek(b["fd"], 0, os.SEEK_CUR)
        try:
            os.lseek(a["fd"], pa + 4099, os.SEEK_SET)
            out.append(check(b["fd"], f"own offset: unmoved when fd {a['fd']} seeks", pb,
                             os.lseek(b["fd"], 0, os.SEEK_CUR)))
        finally:
            os.lseek(a["fd"], pa, os.SEEK_SET)
            os.lseek(b["fd"], pb, os.SEEK_SET)
    return out


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    out = []
    if phase == "inspect":
        out += _independence_checks(e, recs, ctx)
    for rec in recs:
        fd, ino, obs = rec["fd"], rec["extra"]["ino"], rec["obs"]
        content = ctx.model.content(ino)
        acc = obs["flags"] & os.O_ACCMODE
        if phase == "inspect":
            st = os.fstat(fd)
            out.append(check(fd, "size", content.size, st.st_size))
            out.append(check(fd, "nlink", ctx.model.nlink(ino), st.st_nlink))
            if ctx.model.nlink(ino) == 0 and "stat" in rec["extra"]:
                out += _ghost_checks(fd, rec, ctx)
            rfd = _readable_fd(fd)
            try:
                size = content.size
                if size <= FULL_COMPARE_MAX:
                    out.append(bytes_check(fd, "content", content.read(0, size), os.pread(rfd, size + 1, 0)))
                else:
                    for off in sorted({0, obs["pos"], size // 2, max(0, size - SAMPLE)}):
                        out.append(bytes_check(fd, f"content at {off}", content.read(off, SAMPLE),
                                               os.pread(rfd, SAMPLE, off), off))
                if content.data_bytes < content.size:
                    # holes must stay holes (a ghost copy must not blow up a sparse file)
                    allocated = st.st_blocks * 512
                    limit = content.data_bytes + (1 << 20)
                    out.append({"fd": fd, "what": "sparse: allocated bytes", "ok": allocated <= limit,
                                "expected": f"<= {limit}", "got": allocated})
            finally:
                os.close(rfd)
        elif phase == "consume" and acc in (os.O_RDONLY, os.O_RDWR):
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            got = os.read(fd, SAMPLE)
            out.append(bytes_check(fd, "read at offset", content.read(pos, SAMPLE), got, pos))
            out.append(check(fd, "offset after read", pos + len(got), os.lseek(fd, 0, os.SEEK_CUR)))
        elif phase == "mutate" and acc in (os.O_WRONLY, os.O_RDWR) and rec is recs[0]:
            size = os.fstat(fd).st_size
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            os.write(fd, MARKER)
            if obs["flags"] & os.O_APPEND:
                out.append(check(fd, "O_APPEND write lands at end", size + len(MARKER),
                                 os.lseek(fd, 0, os.SEEK_CUR)))
            else:
                out.append(check(fd, "offset after write", pos + len(MARKER), os.lseek(fd, 0, os.SEEK_CUR)))
            end = os.lseek(fd, 0, os.SEEK_CUR)
            rfd = _readable_fd(fd)
            try:
                out.append(check(fd, "written bytes read back", MARKER.decode(),
                                 os.pread(rfd, len(MARKER), end - len(MARKER)).decode(errors="replace")))
            finally:
                os.close(rfd)
    return out
