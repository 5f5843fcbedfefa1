"""``dnotify``: a directory fd with F_NOTIFY (DN_MULTISHOT); a create in the
directory must still raise SIGIO after restore."""

from __future__ import annotations

import fcntl
import os
import time

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import Ctx, Opened, check

try:
    from .. import sysapi
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import sysapi  # type: ignore[no-redef]

KIND = "dnotify"
TAGS = ("dnotify",)


def fields(s) -> dict:
    return {"dnotify": s.Path(), "mask": s.List_(s.Enum(("DN_ACCESS", "DN_MODIFY", "DN_CREATE", "DN_DELETE",
                                                         "DN_RENAME", "DN_ATTRIB")))}


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    return [Opened(os.open(e["dnotify"], os.O_RDONLY | os.O_DIRECTORY), int(e["fd"]), "dnotify")]


def finish(e: dict, fd: int) -> None:
    """F_NOTIFY on the fd's final number: closing *any* fd of the same open
    file removes the registration (fs/notify/dnotify/dnotify.c, dnotify_flush
    on filp_close), so it must not be set on the temporary fd."""
    mask = sysapi.names_to_mask(e.get("mask", ["DN_CREATE"]), sysapi.DN_FLAGS) | sysapi.DN_FLAGS["DN_MULTISHOT"]
    fcntl.fcntl(fd, sysapi.F_NOTIFY, mask)


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
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
