"""fd kinds backed by files: regular files, memfd, directories, devices.

Runs in the guest (stdlib only, Python >= 3.9). What a file fd must show comes
from the seeded model of the scenario's world (harness/world.py), never from
the engine's image.
"""

from __future__ import annotations

import os
from typing import List

try:
    from . import seeded
    from .fdcore import (FULL_COMPARE_MAX, MARKER, MODES, OPEN_FLAGS, SAMPLE, Ctx, Opened, bytes_check, check,
                         flag_bits)
except ImportError:  # pragma: no cover - in the guest, run as a script
    import seeded  # type: ignore[no-redef]
    from fdcore import (FULL_COMPARE_MAX, MARKER, MODES, OPEN_FLAGS, SAMPLE, Ctx, Opened, bytes_check, check,
                         flag_bits)  # type: ignore[no-redef]


def open_file(e: dict, ctx: Ctx) -> List[Opened]:
    flags = MODES[e.get("mode", "r")] | flag_bits(e.get("flags"), OPEN_FLAGS)
    ino = ctx.model.lookup(e["open"])
    out = []
    for i in range(int(e.get("count", 1))):
        fd = os.open(e["open"], flags)
        os.lseek(fd, int(e.get("seek", 0)) + i * int(e.get("seek_step", 0)), os.SEEK_SET)
        out.append(Opened(fd, int(e["fd"]) + i, "file", {"ino": ino}))
    return out


def _readable_fd(fd: int, flags: int) -> int:  # noqa: ARG001
    """A read-only fd on the same open file (reopened through /proc/self/fd,
    which works for deleted files too; proc(5))."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)


def check_file(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    out = []
    for rec in recs:
        fd, ino, obs = rec["fd"], rec["extra"]["ino"], rec["obs"]
        content = ctx.model.content(ino)
        acc = obs["flags"] & os.O_ACCMODE
        if phase == "inspect":
            st = os.fstat(fd)
            out.append(check(fd, "size", content.size, st.st_size))
            out.append(check(fd, "nlink", ctx.model.nlink(ino), st.st_nlink))
            rfd = _readable_fd(fd, obs["flags"])
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
            rfd = _readable_fd(fd, obs["flags"])
            try:
                out.append(check(fd, "written bytes read back", MARKER.decode(),
                                 os.pread(rfd, len(MARKER), end - len(MARKER)).decode(errors="replace")))
            finally:
                os.close(rfd)
    return out


def open_memfd(e: dict, ctx: Ctx) -> List[Opened]:
    fd = os.memfd_create(e["memfd"], 0)
    c = seeded.Content.seeded(int(e["bytes"]), int(e.get("seed", 0)))
    for seg in c.segments:
        os.write(fd, seg.read(0, seg.length))
    os.lseek(fd, int(e.get("seek", 0)), os.SEEK_SET)
    return [Opened(fd, int(e["fd"]), "memfd")]


def check_memfd(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd = recs[0]["fd"]
    c = seeded.Content.seeded(int(e["bytes"]), int(e.get("seed", 0)))
    if phase == "inspect":
        return [check(fd, "link", f"/memfd:{e['memfd']} (deleted)", os.readlink(f"/proc/self/fd/{fd}")),
                bytes_check(fd, "content", c.read(0, c.size), os.pread(fd, c.size + 1, 0))]
    if phase == "consume":
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        return [bytes_check(fd, "read at offset", c.read(pos, SAMPLE), os.read(fd, SAMPLE), pos)]
    return []


def open_dir(e: dict, ctx: Ctx) -> List[Opened]:
    return [Opened(os.open(e["dir"], os.O_RDONLY | os.O_DIRECTORY), int(e["fd"]), "dir")]


def check_dir(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd = recs[0]["fd"]
    if phase != "inspect" or ctx.model.lookup(e["dir"]) is None:
        return []
    return [check(fd, "same directory as its path", os.stat(e["dir"]).st_ino, os.fstat(fd).st_ino)]


def open_device(e: dict, ctx: Ctx) -> List[Opened]:
    return [Opened(os.open(e["device"], MODES[e.get("mode", "r")]), int(e["fd"]), "device",
                   {"rdev": os.stat(e["device"]).st_rdev})]


def check_device(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    rec = recs[0]
    fd = rec["fd"]
    if phase == "inspect":
        return [check(fd, "device number", rec["extra"]["rdev"], os.fstat(fd).st_rdev)]
    if phase == "consume" and e["device"] == "/dev/zero" and rec["obs"]["flags"] & os.O_ACCMODE != os.O_WRONLY:
        return [check(fd, "reads zeros", "0" * 32, os.read(fd, 16).hex())]
    return []
