"""Which vdso blocks ([vvar], [vvar_vclock], [vdso]) a restore can give back.

A restored process starts as a clone of ckpt's restorer, with the block the
kernel gave ckpt at exec; no call makes another one. The restore can only
move that block (mremap of a special mapping: mm/mmap.c
special_mapping_mremap) and unmap pieces of it. So an image's block can be
provided when each of its pieces is one of ckpt's (by name and size) and
the pieces it keeps lie at the same distances from each other as ckpt's
(they are moved as one block; the vdso's code reads [vvar] at a fixed
offset from itself). A process without any (zdtm vdso02) fits; so does
valgrind's, which drops the [vdso] and keeps the [vvar] pages.

The dump judges a process's block by this rule against ckpt's own on the
same kernel (check.py), so one the restore would refuse is refused before
the process is killed; the restore's pre-flight and move_vdso judge it
again against the block they are given.
"""

from __future__ import annotations

import os

from . import procfs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional

NAMES = ("[vvar]", "[vvar_vclock]", "[vdso]")

_OWN: dict = {}


def block(vmas: "List[dict]") -> "List[dict]":
    """The vdso pieces of a parsed maps list, in address order."""
    return sorted((v for v in vmas if v["path"] in NAMES), key=lambda v: v["start"])


def own() -> "List[dict]":
    """ckpt's own block: fixed for the life of a process (read once, only
    the special lines parsed: ckpt's maps are ~150 lines, each parsed line
    dear under TCG)."""
    pid = os.getpid()
    if _OWN.get("pid") != pid:
        text = procfs.read_all("/proc/self/maps").decode("utf-8", "surrogateescape")
        lines = [ln for ln in text.splitlines() if ln.endswith(NAMES)]
        _OWN["block"] = block(procfs.parse_maps("\n".join(lines)))
        _OWN["pid"] = pid
    return _OWN["block"]


def describe(vmas: "List[dict]") -> str:
    return ", ".join(f"{v['path']} {v['end'] - v['start']} at +{v['start'] - vmas[0]['start']:#x}"
                     for v in vmas) or "none"


def misfit(theirs: "List[dict]", mine: "List[dict]") -> "Optional[str]":
    """None when block `theirs` can be made from block `mine` by a move of
    the whole and unmaps; else why not."""
    theirs, mine = block(theirs), block(mine)
    if not theirs:
        return None
    by_name = {v["path"]: v for v in mine}
    names = [v["path"] for v in theirs]
    if len(set(names)) != len(names):
        return f"a vdso piece split in two ({describe(theirs)})"
    for v in theirs:
        m = by_name.get(v["path"])
        if m is None or m["end"] - m["start"] != v["end"] - v["start"]:
            return f"vdso block {describe(theirs)}; a new process gets {describe(mine)}"
    base, mbase = theirs[0], by_name[theirs[0]["path"]]
    for v in theirs[1:]:
        if v["start"] - base["start"] != by_name[v["path"]]["start"] - mbase["start"]:
            return (f"vdso pieces moved apart ({describe(theirs)}); a new process gets them as one block "
                    f"({describe(mine)})")
    return None
