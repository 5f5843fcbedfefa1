"""What a restored process would inherit from ckpt itself and no call can
take back: refused (deny by default), at the dump (judging the restore
that would run where the dump runs) and at the restore.

A restored process is a clone of the restorer, a fork of ckpt. Most of
what a clone inherits the restore sets again from the image (signal
dispositions and mask, limits, scheduling, the prctl attributes of
engine/procattrs.py, cgroups, credentials). Some things only ever get
stricter:

* a seccomp filter (a service manager's SystemCallFilter=, a container's
  profile): filters stack and none is ever removed; strict mode likewise.
  The restored process ran with ckpt's filter under its own.
* memory-deny-write-execute (PR_SET_MDWE without PR_MDWE_NO_INHERIT): it
  cannot be cleared, and the restore itself maps its code W then X (the
  restore failed, EACCES from mprotect, after the dump had killed the
  process).
* no_new_privs: refused by engine/creds.py (plan) when the target lacks it.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List

PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN, PR_MDWE_NO_INHERIT = 1, 2


def _mdwe() -> int:
    from . import arch, libc
    try:
        return libc.syscall(arch.current().SYS["prctl"], PR_GET_MDWE, 0, 0, 0, 0)
    except (libc.SysError, KeyError):
        return 0        # below Linux 6.3: no MDWE


def problems(status: "Dict[str, str]", mdwe: "int | None" = None) -> "List[str]":
    """Why a process restored by this ckpt (status: its own parsed
    /proc/self/status) would carry ckpt's own restrictions."""
    out = []
    mode = status.get("Seccomp", "0").strip() or "0"
    if mode != "0":
        what = "strict mode" if mode == "1" else f"{status.get('Seccomp_filters', '?').strip()} seccomp filter(s)"
        out.append(f"ckpt runs under {what}: a process it restores would inherit them, and none is ever removed; "
                   "run ckpt without (a service's SystemCallFilter=, a container's seccomp profile)")
    mdwe = _mdwe() if mdwe is None else mdwe
    if mdwe & PR_MDWE_REFUSE_EXEC_GAIN and not mdwe & PR_MDWE_NO_INHERIT:
        out.append("ckpt runs with memory-deny-write-execute (PR_SET_MDWE): a process it restores would inherit "
                   "it, and nothing clears it (the restore itself could not make its code executable)")
    return out
