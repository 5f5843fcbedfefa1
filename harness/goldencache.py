"""A prepared guest kept between runs: a worker's guest starts from the
golden snapshot an earlier run of the same code took (QEMU ``-loadvm
golden``), its agent already up and warm, instead of from a kept boot
(harness/bootcache.py) followed by the install, the agent's start and its
warm-up.

Why: that preparation cost every guest of every run 6-9 s of TCG CPU
(idle to loaded: the SSH connection ~2 s, the install ~3-5 s, the agent
and its warm-up ~2.5-5 s), three guests a corpus run at ``-n 2``, the
two workers' first scenarios waiting on it. Loading the kept golden and
checking its agent takes about a second.

Nothing stale can be loaded: the file is found by :func:`key`, the kept
boot's key (the image, the QEMU binary and firmware, the accelerator, the
QEMU command line but its per-run paths, the vm code) and every source file
the golden state was made from or by (engine/, harness/, vm/: what the
install copies, the agent, the code that prepares a guest), and the
``CRUCIBLE_*``/``CKPT_*`` environment. Any change is another file, made by
the next run that prepares a guest of that slot (its newest :data:`KEEP`
stay). A kept golden whose agent does not answer is removed and the guest
prepared as before. Only a guest whose agent came up is kept.

What it changes: a golden state is the same in every run of that code
(its boot id, as the kept boot's already; the agent's and the warm seed's
memory layout: one draw per kept golden, not per run). The clock is set
from the host at the load, as at every revert. ``CRUCIBLE_GOLDEN_CACHE=0``
prepares every guest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

TAG = "golden"
KEEP = 2            # kept goldens per slot (~200 MiB each: the kept boot's overlay and one more state)
#: the trees whose sources make a golden state (the install's, the agent's, the preparing code)
TREES = ("engine", "harness", "vm")
#: per-run variables, not what a guest is prepared with (the run's lifeguard token, where reports go)
ENV_IGNORED = ("CRUCIBLE_LIFEGUARD", "CRUCIBLE_REPORTS")
#: what a kept golden's guest target is told (GuestTarget.adopt)
META_FIELDS = ("kernel", "guest_python", "warm", "warm_note", "digests_note", "digests_seeded")


def enabled() -> bool:
    return os.environ.get("CRUCIBLE_GOLDEN_CACHE", "1") != "0"


def code_id(repo: Path, env: Optional[Dict[str, str]] = None) -> str:
    """The identity of every source a golden state depends on: each file
    under :data:`TREES` but bytecode (path and bytes), and the
    ``CRUCIBLE_*``/``CKPT_*`` environment but :data:`ENV_IGNORED`."""
    h = hashlib.sha256()
    for tree in TREES:
        for p in sorted((Path(repo) / tree).rglob("*")):
            rel = p.relative_to(repo)
            if "__pycache__" in rel.parts or p.suffix == ".pyc" or not p.is_file():
                continue
            h.update(rel.as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    env = os.environ if env is None else env
    for k in sorted(k for k in env if k.startswith(("CRUCIBLE_", "CKPT_")) and k not in ENV_IGNORED):
        h.update(f"{k}={env[k]}\0".encode())
    return h.hexdigest()


def key(booted_key: str, repo: Path, env: Optional[Dict[str, str]] = None) -> str:
    return hashlib.sha256(f"{booted_key}\0{code_id(repo, env)}".encode()).hexdigest()[:24]


def paths(root: Path, slot: str, k: str) -> Tuple[Path, Path]:
    """The kept overlay and its meta file (the guest target's facts)."""
    # (not with_suffix: a slot holds dots, "x86_64-6.1-...")
    return Path(root) / f"{slot}-{k}.qcow2", Path(root) / f"{slot}-{k}.json"


def find(root: Path, slot: str, k: str) -> Optional[Tuple[Path, Dict]]:
    """The kept golden of ``slot`` for ``k`` and its meta (None: none, or
    its meta is unreadable or not this key's)."""
    overlay, meta = paths(root, slot, k)
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if not overlay.exists() or not isinstance(info, dict) or info.get("key") != k \
            or any(f not in info for f in META_FIELDS):
        return None
    return overlay, info


def drop(root: Path, slot: str, k: str) -> None:
    for p in paths(root, slot, k):
        p.unlink(missing_ok=True)


def store(guest, root: Path, slot: str, k: str, facts: Dict) -> None:
    """Keep ``guest``'s overlay (its golden snapshot just taken) and
    ``facts`` (:data:`META_FIELDS`) for the next runs; the slot's older
    ones beyond :data:`KEEP` go. Raises OSError/VmError (the caller only
    reports: it is a cache)."""
    overlay, meta = paths(root, slot, k)
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = overlay.with_name(f".{overlay.name}.{os.getpid()}")
    mtmp = meta.with_name(f".{meta.name}.{os.getpid()}")
    try:
        guest.export_overlay(tmp)
        # its console so far goes with it: a guest loaded from it boots
        # nothing, and a crash report must still show the guest's console
        try:
            console = guest.serial_tail(200)
        except Exception as e:  # noqa: BLE001 - only a report's context
            console = f"(console not kept: {e})"
        mtmp.write_text(json.dumps({"key": k, **{f: facts[f] for f in META_FIELDS}, "console": console}, indent=1))
        os.replace(tmp, overlay)
        os.replace(mtmp, meta)      # last: find() needs it, so a half-kept golden is never found
    finally:
        tmp.unlink(missing_ok=True)
        mtmp.unlink(missing_ok=True)
    kept = sorted(Path(root).glob(f"{slot}-*.qcow2"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in [p for p in kept if p != overlay][KEEP - 1:]:
        old.unlink(missing_ok=True)
        old.with_name(old.name[:-len(".qcow2")] + ".json").unlink(missing_ok=True)
