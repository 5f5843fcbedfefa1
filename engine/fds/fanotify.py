"""fanotify: refused (no checkpoint operation). The detail names what fdinfo
shows (fs/notify/fdinfo.c fanotify_show_fdinfo: "fanotify flags:%x
event-flags:%x" and one line per mark)."""

from __future__ import annotations

from ._util import refuse, refuse_rec

KIND = "fanotify"
REASONS = ("fanotify",)


def _detail(info) -> str:
    text = info.fdinfo_text
    marks = sum(1 for line in text.splitlines() if line.startswith("fanotify ino:") or
                line.startswith("fanotify mnt_id:") or line.startswith("fanotify sdev:"))
    flags = info.fdinfo.get("fanotify flags", "?").split()[0]
    return f"fanotify instance (flags {flags}) with {marks} marks; fanotify cannot be restored"


def classify(info, ctx) -> str:
    """Always raises the `fanotify` refusal."""
    raise refuse(info, "fanotify", _detail(info))


def dump(info, ctx) -> dict:
    raise refuse(info, "fanotify", _detail(info))


def validate(rec: dict, ctx) -> None:
    raise refuse_rec(rec, ctx, "fanotify", "fanotify cannot be restored")


def restore(rec: dict, ctx) -> int:
    raise refuse_rec(rec, ctx, "fanotify", "fanotify cannot be restored")
