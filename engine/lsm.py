"""Security labels (AppArmor, SELinux, Smack: /proc/PID/attr): refused
where they are not ckpt's own.

A restored process is a clone of the restorer and inherits its label at
fork; nothing the engine does changes it. A confined process (an AppArmor
profile: Debian enables AppArmor by default, a service's profile in
enforce mode) would come back unconfined, or under ckpt's confinement,
without a word. The label a process will take at its next exec
(attr/exec) and the ones for the files, keys and sockets it creates
(fscreate, keycreate, sockcreate) would be lost the same way. So: the
process's label must be ckpt's own, and the others unset, else refused
(`unsupported-state`). A kernel without an LSM providing them answers
EINVAL: nothing to compare.
"""

from __future__ import annotations

from .errors import Refusal

NEXT = ("exec", "fscreate", "keycreate", "sockcreate")


def _read(path: str):
    try:
        with open(path, "rb") as f:
            return f.read().rstrip(b"\0\n").decode(errors="replace")
    except OSError:             # EINVAL: no LSM providing it; ENOENT: no such attr on this kernel
        return None


def check(pid: int) -> None:
    """Raises Refusal(unsupported-state) naming the label."""
    theirs = _read(f"/proc/{pid}/attr/current")
    if theirs is None:          # no LSM here provides the attrs: the others answer EINVAL too
        return
    mine = _read("/proc/self/attr/current")
    if theirs != mine:
        raise Refusal("unsupported-state", f"security label {theirs!r} (ckpt runs as {mine!r}): the restored "
                      "process would have ckpt's", pid=pid)
    for name in NEXT:
        label = _read(f"/proc/{pid}/attr/{name}")
        if label:
            raise Refusal("unsupported-state", f"security label {label!r} in attr/{name} (for its next exec or "
                          "what it creates), which is not restored", pid=pid)
