"""The parent-death signal (PR_SET_PDEATHSIG) of a tree member, restored.

It is per task, shown by no /proc file (read by injection: engine/dump.py)
and fires when the *thread* that forked the task exits
(kernel/exit.c forget_original_parent: real_parent is a thread).

Restored exactly only where the restore rebuilds that relation: a member
of a dumped tree forked by its parent's leader thread (its pid in
/proc/PPID/task/PPID/children); the restore forks it from the restored
parent's leader too (engine/tree_restore.py, an injected clone3), so
after its credentials (commit_creds clears the signal on a change of
ids) the member sets it again itself and it fires when that parent dies,
as before. Refused (`unsupported-state`), as before:
  * the dump's root, or a process alone: its parent is outside the dump,
    and the restored process is not that parent's child (set again, it
    would fire when ckpt's restorer exits; dropped, the death of the old
    parent would no longer kill it);
  * a member forked by another thread of its parent (the restore forks
    from the leader: it would fire on the wrong thread's exit);
  * a thread's own (engine/threads.py).
"""

from __future__ import annotations

from .errors import Refusal

PR_SET_PDEATHSIG = 1


def dump(pid: int, sig: int, ppid: int, ctx) -> int:
    """The value to record (0: none), or raises Refusal."""
    if not sig:
        return 0
    why = None
    if ctx is None or ctx.tree_root is None or pid == ctx.tree_root or ppid not in ctx.tree_pids:
        why = "its parent is outside the dump (dump the tree of its parent)"
    else:
        try:
            with open(f"/proc/{ppid}/task/{ppid}/children") as f:
                by_leader = str(pid) in f.read().split()
        except OSError:
            by_leader = False
        if not by_leader:
            why = f"it was forked by a thread of its parent {ppid} other than the leader"
    if why:
        raise Refusal("unsupported-state", f"has a parent-death signal (PR_SET_PDEATHSIG {sig}), which is "
                      f"not restored: {why}", pid=pid)
    return sig


def check_record(sig) -> bool:
    return isinstance(sig, int) and not isinstance(sig, bool) and 0 <= sig <= 64


def restore(b) -> None:
    """In the member, once its credentials are set."""
    sig = b.job.core.get("pdeath_signal", 0)
    if sig:
        b.call("prctl", PR_SET_PDEATHSIG, sig, 0, 0, 0)
