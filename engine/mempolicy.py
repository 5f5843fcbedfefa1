"""NUMA memory policy: the process's own (set_mempolicy(2): a program
started by `numactl --interleave=all`, `--preferred=N`, `--membind=N`)
restored exactly; a mapping's own (mbind(2)) refused (`numa-policy`).

A restored process is a clone of the restorer: without this it would
come back with the default policy, its memory placed by the default
rules from then on, and get_mempolicy(2) telling it so.

The process's policy is readable by the process alone: get_mempolicy
(mode with its flags, the nodes) is one of the dump's injected reads
(engine/dump.py, batched with the others), queued back with set_mempolicy
among the new process's settings (engine/build.py process_state), so the
threads it then clones inherit it. The policy is per thread: each thread's
is read too (engine/threads.py) and set in it where it differs. With MPOL_F_STATIC_NODES or
MPOL_F_RELATIVE_NODES get_mempolicy gives the nodes as the user passed
them, which set back gives the same policy; without them the nodes must
be allowed here (Mems_allowed of the restorer) or the restore is refused
before the process exists.

A mapping's own policy shows in /proc/PID/numa_maps - but there a mapping
without one shows the process's policy. With the default process policy
(nearly always) any mapping not shown "default" has its own; otherwise
each mapping is asked from inside (get_mempolicy MPOL_F_ADDR gives the
mapping's own policy, or the default). Restoring those would take an
mbind per range (shared memory's per-range shared policy too): refused.
"""

from __future__ import annotations

import struct

from .errors import Refusal

MAXNODE = 192                 # the node mask bits read back (24 bytes: the batch's 32-byte out buffer less the mode)
MPOL_DEFAULT, MPOL_LOCAL = 0, 4
MPOL_MAX = 7                  # MPOL_PREFERRED_MANY 5, MPOL_WEIGHTED_INTERLEAVE 6
MPOL_F_STATIC_NODES, MPOL_F_RELATIVE_NODES, MPOL_F_NUMA_BALANCING = 1 << 15, 1 << 14, 1 << 13
MODE_FLAGS = MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES | MPOL_F_NUMA_BALANCING
MPOL_F_ADDR = 1 << 1
NAMES = {0: "default", 1: "preferred", 2: "bind", 3: "interleave", 4: "local", 5: "preferred-many",
         6: "weighted-interleave"}


def _decode(raw: bytes) -> list:
    mode = struct.unpack_from("<i", raw, 0)[0]
    return [mode, int.from_bytes(raw[8:8 + MAXNODE // 8], "little")]


_READS = [("mempolicy", "get_mempolicy", lambda scr: (scr, scr + 8, MAXNODE, 0, 0), 8 + MAXNODE // 8, _decode)]
_HERE: list = []


def reads() -> list:
    """engine/dump.py _injected_reads appends these (as procattrs.READS);
    none on a kernel without NUMA (get_mempolicy ENOSYS, asked once of
    ckpt itself: the same kernel), where there is no policy to save."""
    if not _HERE:
        from . import arch, libc
        try:
            libc.syscall(arch.current().SYS["get_mempolicy"], 0, 0, 0, 0, 0)
            _HERE.append(True)
        except libc.SysError:
            _HERE.append(False)
    return _READS if _HERE[0] else []


def describe(rec: list) -> str:
    mode, nodes = rec
    base = mode & ~MODE_FLAGS
    flags = [n for f, n in ((MPOL_F_STATIC_NODES, "static"), (MPOL_F_RELATIVE_NODES, "relative"),
                            (MPOL_F_NUMA_BALANCING, "balancing")) if mode & f]
    text = NAMES.get(base, str(base)) + ("=" + "|".join(flags) if flags else "")
    return text + (f" nodes {_nodelist(nodes)}" if nodes else "")


def _nodelist(mask: int) -> str:
    return ",".join(str(i) for i in range(mask.bit_length()) if mask >> i & 1)


def check_record(rec) -> bool:
    """Structure of core.json "mempolicy" (restore's check_core)."""
    try:
        mode, nodes = rec
        return all(type(x) is int for x in rec) and 0 <= mode & ~MODE_FLAGS < MPOL_MAX and \
            mode & ~(MODE_FLAGS | 7) == 0 and 0 <= nodes < 1 << MAXNODE
    except (TypeError, ValueError):
        return False


def vma_policies(task, scr: int, vmas: list, mode: int) -> None:
    """Refuses (numa-policy) a mapping with a policy of its own (mbind)."""
    try:
        with open(f"/proc/{task.pid}/numa_maps") as f:
            text = f.read()
    except FileNotFoundError:       # a kernel without CONFIG_NUMA: no policies at all
        return
    shown = {}
    for line in text.splitlines():
        addr, _, rest = line.partition(" ")
        shown[int(addr, 16)] = rest
    for v in vmas:
        pol = shown.get(v["start"], "default")
        if pol.startswith("default"):
            continue
        if mode != MPOL_DEFAULT:
            # what a mapping without a policy of its own shows too: ask the mapping's own
            task.call("get_mempolicy", scr, 0, 0, v["start"], MPOL_F_ADDR)
            own = struct.unpack("<i", task.read_mem(scr, 4))[0]
            if own == MPOL_DEFAULT:
                continue
        raise Refusal("numa-policy", f"mapping {v['start']:#x}-{v['end']:#x} {v['path'] or '[anon]'} has a NUMA "
                      f"memory policy of its own (mbind: {pol.split(' ')[0]}), which is not restored",
                      pid=task.pid)


def validate(rec: list) -> list:
    """What is refused before the process exists: nodes not allowed here."""
    mode, nodes = rec
    if mode & (MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES) or not nodes:
        return []
    here = allowed_nodes()
    if here is None or nodes & ~here == 0:
        return []
    return [Refusal("numa-policy", f"memory policy {describe(rec)} names NUMA nodes "
                    f"{_nodelist(nodes & ~here)} that are not allowed here (Mems_allowed {_nodelist(here)})")]


def allowed_nodes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Mems_allowed:"):
                    return int(line.split(":", 1)[1].strip().replace(",", ""), 16)
    except (OSError, ValueError):
        pass
    return None


def queue_thread(tb, rec: list, leader: list) -> None:
    """A thread's own policy, where it is not the leader's it inherited."""
    if list(rec) != list(leader):
        from .batch import Data
        tb.pending.add("set_mempolicy", rec[0], Data(rec[1].to_bytes(MAXNODE // 8, "little")), MAXNODE + 1)


def queue(b, rec: list) -> None:
    """With the other process settings (Builder.process_state's batch).
    set_mempolicy reads maxnode - 1 bits (mm/mempolicy.c get_nodes)."""
    mode, nodes = rec
    if mode != MPOL_DEFAULT:
        from .batch import Data
        b.pending.add("set_mempolicy", mode, Data(nodes.to_bytes(MAXNODE // 8, "little")), MAXNODE + 1)
