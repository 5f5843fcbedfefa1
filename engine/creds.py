"""Credentials: user and group ids (real, effective, saved, filesystem),
supplementary groups, the five capability sets, and the audit login
session (loginuid, sessionid).

A restored process is a clone of the restorer, so it starts with ckpt's
credentials. Before, only two shapes came back: ckpt's own (whatever the
target's supplementary groups were: a root process that had called
setgroups came back with ckpt's groups) and an unprivileged user with no
capabilities at all; a daemon that dropped capabilities, kept some across
a setuid, or has ambient ones was refused. Now any credentials root can
reach by dropping are set, in the only order the kernel allows
(security/commoncap.c):

  1. setgroups                                 needs CAP_SETGID
  2. capset with the image's inheritable set   allowed while CAP_SETPCAP is
     effective and the set is within ckpt's inheritable | bounding set
     (before the bounding set shrinks: a process may hold inheritable bits
     its bounding set no longer has)
  3. PR_CAPBSET_DROP for every bit to go       needs CAP_SETPCAP
  4. PR_SET_KEEPCAPS 1, setresgid, setresuid   the ids; keep-caps keeps the
     permitted set over the change from root (cap_emulate_setxuid clears
     it otherwise, and always clears the effective and ambient sets)
  5. capset (effective back to permitted), setfsgid, setfsuid: a
     filesystem id of its own needs CAP_SETUID/CAP_SETGID again (setfs*
     fails silently, which is why everything is read back at the end)
  6. capset with the image's three sets         only ever a subset of what
     it holds now
  7. PR_CAP_AMBIENT_RAISE for every ambient bit (each is in the permitted
     and inheritable sets by the kernel's own rule)
  8. keep-caps back as it was (engine/procattrs.py sets it on when it was)

Then the restorer reads /proc/PID/status back (every thread's) and fails
the restore on any difference: setfsuid and a capset that silently keeps
a bit are the kind of loss only a read-back sees.

The audit loginuid can be written only by the process itself
(/proc/self/loginuid, proc_loginuid_write), and writing a valid one makes
the kernel hand out a new session id (audit_set_loginuid: a global
counter, never a chosen value). So an unset loginuid (a daemon started by
init) is restored exactly, by writing it unset; a process of another audit
login session than ckpt's is refused: its session id could not come back.
"""

from __future__ import annotations

import struct

from .errors import EngineError, Refusal

TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional

CAP_SETGID, CAP_SETUID, CAP_SETPCAP, CAP_AUDIT_CONTROL = 6, 7, 8, 30
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 47, 2, 4
CAP_V3 = 0x20080522
CAPS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
UNSET = 0xFFFFFFFF          # AUDIT_UID_UNSET, AUDIT_SID_UNSET
O_WRONLY = 1
AT_FDCWD = -100


def _ids(status: Dict[str, str], key: str) -> List[int]:
    return [int(x) for x in status.get(key, "").split()]


def audit_of(pid: str = "self") -> Optional[List[int]]:
    """[loginuid, sessionid], or None on a kernel without audit."""
    try:
        with open(f"/proc/{pid}/loginuid", "rb") as f:
            luid = int(f.read())
        with open(f"/proc/{pid}/sessionid", "rb") as f:
            sid = int(f.read())
    except (OSError, ValueError):
        return None
    return [luid, sid]


def record(status: Dict[str, str], pid="self") -> dict:
    """What /proc/PID/status (and the audit files) show of the credentials."""
    rec = {"uid": _ids(status, "Uid"), "gid": _ids(status, "Gid"), "groups": _ids(status, "Groups"),
           "caps": {k: status.get(k, "") for k in CAPS}, "no_new_privs": status.get("NoNewPrivs", "0")}
    audit = audit_of(str(pid))
    if audit is not None:
        rec["audit"] = audit
    return rec


def _bits(caps: dict) -> Dict[str, int]:
    return {k: int(caps[k], 16) for k in CAPS}


def _names(bits: int) -> str:
    return ",".join(str(i) for i in range(64) if bits >> i & 1)


def changes_ids(creds: dict, mine: dict) -> bool:
    """Does the restore change an effective or filesystem id? (commit_creds
    then resets dumpable to fs.suid_dumpable: engine/procattrs.py)."""
    return creds["uid"][1:] != mine["uid"][1:] or creds["gid"][1:] != mine["gid"][1:]


def plan(creds: dict, mine: dict) -> str:
    """"same" (nothing to do), "setid" (an effective or filesystem id
    changes), "set" (groups or capabilities only), or raises Refusal."""
    if creds.get("no_new_privs") != mine.get("no_new_privs") and creds.get("no_new_privs") != "1":
        raise Refusal("unsupported-state", "ckpt runs with no_new_privs set, the target did not: "
                      "it cannot be cleared")
    for why in mine.get("inherited", ()):     # ckpt's own seccomp filters, MDWE (engine/selfstate.py)
        raise Refusal("unsupported-state", why)
    audit_plan(creds.get("audit"), mine.get("audit"))
    if creds["uid"] == mine["uid"] and creds["gid"] == mine["gid"] and creds["caps"] == mine["caps"] \
            and sorted(creds["groups"]) == sorted(mine["groups"]):
        return "same"
    t, m = _bits(creds["caps"]), _bits(mine["caps"])
    # What the kernel never lets a process hold: an image that says so was
    # not made from a live process.
    if t["CapEff"] & ~t["CapPrm"] or t["CapAmb"] & ~(t["CapPrm"] & t["CapInh"]):
        raise Refusal("image-invalid", f"capability sets no process can hold: {creds['caps']}")
    need = (1 << CAP_SETGID) | (1 << CAP_SETUID) | (1 << CAP_SETPCAP)
    short = []
    if m["CapEff"] & need != need:
        short.append(f"CAP_SETUID, CAP_SETGID and CAP_SETPCAP effective (ckpt has {mine['caps']['CapEff']})")
    if t["CapPrm"] & ~m["CapPrm"]:
        short.append(f"permitted capabilities {_names(t['CapPrm'] & ~m['CapPrm'])} it lacks")
    if t["CapBnd"] & ~m["CapBnd"]:
        short.append(f"bounding-set capabilities {_names(t['CapBnd'] & ~m['CapBnd'])} it lacks")
    if t["CapInh"] & ~(m["CapInh"] | m["CapBnd"]):
        short.append(f"inheritable capabilities {_names(t['CapInh'] & ~(m['CapInh'] | m['CapBnd']))} "
                     "outside its bounding set")
    if short:
        raise Refusal("capability", f"the process's credentials (uid {creds['uid']} gid {creds['gid']} groups "
                      f"{creds['groups']} caps {creds['caps']}) need, in ckpt: " + "; ".join(short))
    return "setid" if changes_ids(creds, mine) else "set"


def audit_plan(theirs: Optional[List[int]], mine: Optional[List[int]]) -> Optional[int]:
    """The loginuid to write in the new process (None: nothing to do), or
    raises Refusal(unsupported-state)."""
    if theirs is None or mine is None or list(theirs) == list(mine):
        return None
    luid, sid = theirs
    if luid == UNSET and sid == UNSET:
        return UNSET
    raise Refusal("unsupported-state", f"audit login session (loginuid {luid}, sessionid {sid}) is not ckpt's "
                  f"(loginuid {mine[0]}, sessionid {mine[1]}): setting a loginuid makes the kernel hand out a "
                  "new session id, so the process could not rejoin its session; run ckpt from that login "
                  "session")


def audit_early(b) -> None:
    """The leader's loginuid, before its threads are cloned (they inherit
    it): only the process itself can write it. Needs CAP_AUDIT_CONTROL
    while ckpt's is set, so before the credentials drop."""
    core = b.job.core
    want = audit_plan(core["creds"].get("audit"), audit_of())
    if want is None:
        return
    path = b.put(b"/proc/self/loginuid\0", 0)
    text = str(want).encode()      # AUDIT_UID_UNSET as an unsigned number: "-1" is EINVAL
    fd = b.call("openat", AT_FDCWD & 0xFFFFFFFFFFFFFFFF, path, O_WRONLY, 0)
    try:
        b.call("write", fd, b.put(text, 64), len(text))
    finally:
        b.call("close", fd)
    got = audit_of(str(b.pid))
    if got != list(core["creds"]["audit"]):
        raise EngineError(f"audit loginuid/sessionid came back {got}, not {core['creds']['audit']}", pid=b.pid)


def _capset(b, eff: int, prm: int, inh: int) -> None:
    data = struct.pack("<Ii", CAP_V3, 0) + struct.pack("<6I", eff & 0xFFFFFFFF, prm & 0xFFFFFFFF, inh & 0xFFFFFFFF,
                                                       eff >> 32, prm >> 32, inh >> 32)
    addr = b.put(data, 128)
    b.call("capset", addr, addr + 8)


def apply(b) -> None:
    """The injected calls that turn the clone's credentials (ckpt's) into the
    image's; core["_creds_plan"] was set by restore's checks."""
    core = b.job.core
    if core.get("_creds_plan") in (None, "same"):
        return
    c = core["creds"]
    mine = record(procfsself_status())
    t, m = _bits(c["caps"]), _bits(mine["caps"])
    if sorted(c["groups"]) != sorted(mine["groups"]):
        groups = c["groups"]
        b.call("setgroups", len(groups), b.put(struct.pack(f"<{len(groups)}I", *groups), 256) if groups else 0)
    if t["CapInh"] != m["CapInh"]:
        _capset(b, m["CapEff"], m["CapPrm"], t["CapInh"])
    for bit in range(64):
        if (m["CapBnd"] & ~t["CapBnd"]) >> bit & 1:
            b.call("prctl", PR_CAPBSET_DROP, bit, 0, 0, 0)
    if c["uid"] != mine["uid"] or c["gid"] != mine["gid"]:
        b.call("prctl", PR_SET_KEEPCAPS, 1, 0, 0, 0)
        b.call("setresgid", *c["gid"][:3])
        b.call("setresuid", *c["uid"][:3])
        _capset(b, m["CapPrm"], m["CapPrm"], t["CapInh"])
        b.call("setfsgid", c["gid"][3])
        b.call("setfsuid", c["uid"][3])
        b.call("prctl", PR_SET_KEEPCAPS, 0, 0, 0, 0)
    if m["CapAmb"]:
        b.call("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _capset(b, t["CapEff"], t["CapPrm"], t["CapInh"])
    for bit in range(64):
        if t["CapAmb"] >> bit & 1:
            b.call("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, bit, 0, 0)


def procfsself_status() -> Dict[str, str]:
    from . import procfs
    return procfs.self_status()


def verify(pid: int, creds: dict, tid: Optional[int] = None) -> None:
    """Read back what the kernel now shows; any difference fails the restore."""
    from . import procfs
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    with open(path) as f:
        status = procfs.parse_status(f.read())
    got = {"uid": _ids(status, "Uid"), "gid": _ids(status, "Gid"), "groups": sorted(_ids(status, "Groups")),
           "caps": {k: status.get(k, "") for k in CAPS}}
    want = {"uid": creds["uid"], "gid": creds["gid"], "groups": sorted(creds["groups"]), "caps": creds["caps"]}
    if got != want:
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        raise EngineError(f"task {tid or pid}: credentials came back other than dumped (got, wanted): {diff}",
                          pid=pid)
