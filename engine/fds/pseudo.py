"""Files and directories on kernel pseudo filesystems (proc, sysfs, nsfs,
cgroup, debugfs, tracefs, mqueue, hugetlbfs, ...; engine/fstype.py): refused.

Their "contents" are kernel state made at open or read time, often about
the opener (/proc/self/...), a namespace (nsfs) or a cgroup; a reopen by
path after a restore gives another object (another PID's /proc entry, the
current value of a sysfs attribute, a new mqueue descriptor), so no reopen
is exact. They are refused at dump, by filesystem, before the target is
harmed: a dump that restore would refuse must not happen.
"""

from __future__ import annotations

from .. import fstype
from ._util import refuse, refuse_rec

KIND = "pseudo"
REASONS = ("pseudo-file",)


def _detail(info) -> str:
    fs = fstype.name(info.fs_magic if info.fs_magic != -1 else None)
    return (f"open file on the {fs} pseudo filesystem ({info.link}): kernel state, not stored "
            "bytes; a reopen would give another object")


def classify(info, ctx) -> str:
    """Always raises the `pseudo-file` refusal."""
    raise refuse(info, "pseudo-file", _detail(info))


def dump(info, ctx) -> dict:
    raise refuse(info, "pseudo-file", _detail(info))


def validate(rec: dict, ctx) -> None:
    raise refuse_rec(rec, ctx, "pseudo-file", "files on pseudo filesystems cannot be restored")


def restore(rec: dict, ctx) -> int:
    raise refuse_rec(rec, ctx, "pseudo-file", "files on pseudo filesystems cannot be restored")
