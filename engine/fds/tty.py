"""Pseudo-terminals: a pty pair the process holds both ends of (a driver
program, a multiplexer), and a pty slave whose master is outside (the
process runs on someone's terminal: `criu --shell-job`).

Pair in the dump (master /dev/ptmx and slave /dev/pts/N held by the
process, or by members of a dumped tree - a driver such as script(1)
holding the master, the program it runs the slave -, by nobody else; the
holders matched exactly by the slave inode the master's TIOCGPTPEER
names, opened O_PATH; surveyed and drained once for the tree, keys
"tree:tty:..."): restored with the same index N (devpts hands
out the lowest free index, so the restore opens /dev/ptmx until it gets
N and closes the others; N taken by someone else is refused `tty`), the
slave's termios (termios2: speeds too) and window size, packet mode,
the lock (TIOCSPTLCK), exclusive mode, the /dev/pts/N node's mode and
owner, the bytes queued in both directions (_tty: drained and put back at
dump, written again at restore; in a tree the master's member's image
holds them, its one build hands every member's ends out), and, when the
pair's slave is a session's controlling terminal, the session (TIOCSCTTY
from the restored session leader: in a tree right after its setsid(),
before it forks its session, session_terminals) and the foreground
process group (TIOCSPGRP), which must be one of the dump's.

Slave whose master is outside: the terminal belongs to whoever holds the
master, which the restore cannot bring back. With ``ckpt dump
--shell-job`` the slave's termios is saved and ``ckpt restore --tty PATH``
reopens every such fd on the terminal PATH (``--tty inherit``: ckpt's own
standard input) with the saved termios applied; anything else is
`tty-outside`, at dump and at restore, naming why.

Refused as `tty`: a pair end also held by a process outside the dump, a
master whose slave no process of the dump holds, a line discipline other
than N_TTY, a pair of another devpts instance, a pair that is the
controlling terminal of a session whose leader is not in the dump or
whose foreground group is none of the dump's, /dev/tty on such a pair
shared by two members (each reopens its own: _devtty), an index taken at
restore. Refused as `tty-queued`: canonical mode with VEOF disabled or a
literal-next pending (the line being typed cannot be made readable, see
_tty.take_canonical), a pending packet-mode status, flow-control
characters queued in packet mode with IXON.
"""

from __future__ import annotations

import os
import stat
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional

from .. import pidfd
from ..errors import EngineError, Refusal
from . import _tty
from ._dups import is_follower
from ._peers import holders
from ._util import failed, refuse, refuse_rec, reopen_in_process, with_status_flags
from ._util import tree_fds as _tree_fds

KIND = "tty"
REASONS = ("tty", "tty-queued", "tty-outside", "capability", "image-invalid")
MAX_INDEX_TRIES = 1024      # ptys held open at once to reach a high index
INDEX_WAIT = 2.0            # seconds for a just-closed pair's index to be free again
O_LARGEFILE = 0o100000      # what open(2) adds on 64-bit (force_o_largefile); same on x86_64 and aarch64
O_PATH = 0o10000000         # x86_64 and aarch64 alike (asm-generic/fcntl.h)


def is_pty(info) -> bool:
    """A pty master or slave character device (not /dev/tty)."""
    return stat.S_ISCHR(info.mode) and (_tty.is_master(info.rdev) or _tty.slave_index(info.rdev) is not None)


def _is_devtty(info) -> bool:
    return (os.major(info.rdev), os.minor(info.rdev)) == _tty.DEVTTY_RDEV


def _stat_fields(pid: int) -> dict:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    rest = text[text.rindex(")") + 2:].split()
    return {"pgrp": int(rest[2]), "session": int(rest[3]), "tty_nr": int(rest[4]), "tpgid": int(rest[5])}


def ctty_index(pid: int) -> Optional[int]:
    """The pty index of the process's controlling terminal, or None."""
    nr = _stat_fields(pid)["tty_nr"]
    if not nr:
        return None
    major, minor = (nr >> 8) & 0xFFF, (nr & 0xFF) | ((nr >> 12) & 0xFFF00)
    return _tty.slave_index(os.makedev(major, minor))


def _master_index(info) -> int:
    idx = info.fdinfo.get("tty-index")
    if idx is not None and idx.strip().lstrip("-").isdigit():
        return int(idx)
    with pidfd.target_fd(info.pid, info.fd) as dup:
        return _tty.ioc_int(dup, _tty.TIOCGPTN)


def _index(info) -> int:
    return _master_index(info) if _tty.is_master(info.rdev) else _tty.slave_index(info.rdev)


def _ends(ctx) -> Dict[int, Dict[str, List]]:
    """pty index -> {"master": [FdInfo], "slave": [FdInfo]} over the
    process's fds (computed once per dump)."""
    got = ctx.shared.get("tty:ends")
    if got is None:
        got = {}
        for info in ctx.all_fds.values():
            if not is_pty(info):
                continue
            side = "master" if _tty.is_master(info.rdev) else "slave"
            got.setdefault(_index(info), {"master": [], "slave": []})[side].append(info)
        ctx.shared["tty:ends"] = got
    return got


def _outside_masters(ctx, index: int) -> List[tuple]:
    """(pid, fd) of /dev/ptmx fds of other processes on pty `index`
    (fdinfo tty-index)."""
    out = []
    for link in ("/dev/ptmx", "/dev/pts/ptmx"):
        for pid, fd in holders(ctx, link, *_ptmx_id(link)):
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    text = f.read()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("tty-index:") and int(line.split()[1]) == index:
                    out.append((pid, fd))
    return out


def _members(ctx, own: int) -> List[int]:
    """The processes of the dump: the members of a dumped tree, or `own`."""
    return sorted(set(getattr(ctx, "tree_pids", ()) or ()) | {own})



def _fdinfo_index(pid: int, fd: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("tty-index:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _tree_master(ctx, index: int):
    for pid, fd, link in _tree_fds(ctx, ctx.pid):
        if link in ("/dev/ptmx", "/dev/pts/ptmx") and _fdinfo_index(pid, fd) == index:
            return pid, fd
    return None


def _slave_id(pid: int, fd: int) -> tuple:
    """(st_dev, st_ino) of the slave inode of the master `fd` of `pid`: its
    own devpts instance's /dev/pts/N, opened O_PATH by TIOCGPTPEER (no tty
    open: do_dentry_open stops at O_PATH), so the pair is known exactly,
    whatever instance and index the slave holders' links show."""
    with pidfd.target_fd(pid, fd) as dup:
        peer = _tty.ioc_call(dup, _tty.TIOCGPTPEER, O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(peer)
    finally:
        os.close(peer)
    return st.st_dev, st.st_ino


def _dump_ends(info, ctx, index: int) -> Dict[str, List[tuple]]:
    """{"master": [(pid, fd)], "slave": [(pid, fd)]}: every fd of the dump
    (this process, the other members of a tree) on pty `index`, one per
    open file description of this process (its own ends: _ends), matched
    to the pair exactly by the slave inode (_slave_id); the first master
    is this process's when it holds one."""
    own = _ends(ctx).get(index) or {"master": [], "slave": []}
    out = {side: [(i.pid, i.fd) for i in own[side]] for side in ("master", "slave")}
    for pid, fd, link in _tree_fds(ctx, info.pid):
        if link in ("/dev/ptmx", "/dev/pts/ptmx"):
            if _fdinfo_index(pid, fd) == index:
                out["master"].append((pid, fd))
        elif link == f"/dev/pts/{index}":
            out["slave"].append((pid, fd))
    if not out["master"]:
        return out
    want = _slave_id(*out["master"][0])
    out["master"] = [e for e in out["master"] if e == out["master"][0] or _slave_id(*e) == want]
    slaves = []
    for pid, fd in out["slave"]:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == want:
            slaves.append((pid, fd))
    out["slave"] = slaves
    return out


def _ptmx_id(link: str):
    try:
        st = os.stat(link)
        return st.st_dev, st.st_ino
    except OSError:
        return -1, -1


def _pair(info, ctx) -> dict:
    """The facts of the pair `info` belongs to (cached per index, for every
    member of a tree: one survey, one drain of its queues); raises the
    refusals."""
    index = _index(info)
    key = f"tree:tty:pair:{index}"
    if key in ctx.shared:
        got = ctx.shared[key]
        if isinstance(got, Refusal):
            raise got.__class__(got.reason, got.detail, pid=info.pid, fd=info.fd, path=info.link)
        return got
    try:
        got = _survey_pair(info, ctx, index)
    except Refusal as r:
        ctx.shared[key] = r
        raise
    ctx.shared[key] = got
    return got


def _survey_pair(info, ctx, index: int) -> dict:
    ends = _dump_ends(info, ctx, index)
    if not ends["master"] and not ends["slave"]:     # a caller that gave no fd table: the fd alone
        ends["master" if _tty.is_master(info.rdev) else "slave"].append((info.pid, info.fd))
    name = f"/dev/pts/{index}"
    outside_m = _outside_masters(ctx, index)
    slave_st = os.stat(f"/proc/{ends['slave'][0][0]}/fd/{ends['slave'][0][1]}") if ends["slave"] else None
    outside_s = holders(ctx, name, slave_st.st_dev, slave_st.st_ino) if slave_st else []
    if not ends["master"]:
        how = f"held by pid {outside_m[0][0]} (fd {outside_m[0][1]})" if outside_m else "held by no process here"
        return {"index": index, "outside": True, "master_where": how}
    if outside_m:
        raise refuse(info, "tty", f"pty {index}: its master is also held by pid {outside_m[0][0]} "
                     f"(fd {outside_m[0][1]}), a process outside the dump")
    if outside_s:
        raise refuse(info, "tty", f"pty {index}: its slave {name} is also held by pid {outside_s[0][0]} "
                     f"(fd {outside_s[0][1]}), a process outside the dump")
    if not ends["slave"]:
        raise refuse(info, "tty", f"pty {index}: the dump holds the master but not the slave {name} "
                     "(whether the slave was ever opened, and its input queue, cannot be read without opening it)")
    devpts = _ptmx_id("/dev/pts/ptmx")[0]
    if slave_st.st_dev != devpts:
        raise refuse(info, "tty", f"pty {index} belongs to another devpts instance (device {slave_st.st_dev}) "
                     "than /dev/pts, where the restore makes it")
    (mpid, mfd_n), (spid, sfd_n) = ends["master"][0], ends["slave"][0]
    with pidfd.target_fd(mpid, mfd_n) as mfd, pidfd.target_fd(spid, sfd_n) as sfd:
        # The master's own side: its termios no ioctl can change (the
        # master's termios ioctls act on the slave, tty_mode_ioctl), but its
        # line discipline is its own (TIOCSETD on the master fd; another
        # one answers the termios ioctls itself: first).
        mline = _tty.ioc_int(mfd, _tty.TIOCGETD)
        if mline != 0:
            raise refuse(info, "tty", f"pty {index}: the master's line discipline is {mline}, only N_TTY (0) "
                         "is restored")
        termios = _tty.get_termios(mfd)
        f = _tty.fields(termios)
        if f["line"] != 0:
            raise refuse(info, "tty", f"pty {index}: line discipline {f['line']}, only N_TTY (0) is restored")
        sid = _tty.maybe_int(mfd, _tty.TIOCGSID)
        fg = _tty.maybe_int(mfd, _tty.TIOCGPGRP)
        packet = _tty.ioc_int(mfd, _tty.TIOCGPKT)
        rec = {"index": index, "outside": False, "termios": termios.hex(), "winsize": list(_tty.get_winsize(mfd)),
               "packet": packet, "locked": _tty.ioc_int(mfd, _tty.TIOCGPTLCK),
               "excl": _tty.ioc_int(sfd, _tty.TIOCGEXCL), "ctty": False, "fg": None,
               "out_len": _tty.ioc_int(mfd, _tty.FIONREAD), "in_len": _tty.ioc_int(sfd, _tty.FIONREAD),
               "_master": (mpid, mfd_n), "_slave": (spid, sfd_n)}
        if packet and _tty.poll_bits(mfd) & 2:        # POLLPRI: a packet status waits (n_tty_poll)
            raise refuse(info, "tty-queued", f"pty {index}: a packet-mode status byte waits to be read on the "
                         "master; reading it would consume it")
        if (_tty.canonical(termios) or rec["in_len"]) and not _tty.may_sti():
            raise refuse(info, "capability", f"pty {index}: putting its input queue back needs TIOCSTI, which "
                         "needs CAP_SYS_ADMIN")
        if _tty.canonical(termios) and not f["cc"][_tty.VEOF]:
            raise refuse(info, "tty-queued", f"pty {index}: canonical mode with VEOF disabled: a line being typed "
                         "could not be seen (it is made readable by ending it with VEOF)")
    node = os.stat(name) if os.path.exists(name) else slave_st
    rec["node"] = {"mode": stat.S_IMODE(node.st_mode), "uid": node.st_uid, "gid": node.st_gid}
    if sid is not None:
        rec["ctty"], rec["fg"], rec["sid"] = True, fg, _session_of(info, ctx, index, sid, fg)
    return rec


def _session_of(info, ctx, index: int, sid: int, fg: Optional[int]) -> int:
    """The session whose controlling terminal pty `index` is, when the
    restore can make it so again: its leader is a process of the dump (it
    does setsid() then TIOCSCTTY, engine/tree_restore.py), every process of
    the dump in the session has it as controlling terminal (they inherit it
    from the leader, forked after), and the foreground group is one of the
    dump's in that session (TIOCSPGRP once the groups exist). Raises `tty`."""
    members = _members(ctx, info.pid)
    if sid not in members:
        raise refuse(info, "tty", f"pty {index} is the controlling terminal of session {sid}, whose leader is "
                     "not in the dump")
    stats = {}
    for pid in members:
        try:
            stats[pid] = _stat_fields(pid)
        except (OSError, ValueError, IndexError):
            continue
    if stats.get(sid, {}).get("session") != sid or ctty_index(sid) != index:
        raise refuse(info, "tty", f"pty {index} names session {sid} but is not the controlling terminal of "
                     f"pid {sid} as its session leader")
    groups = {st["pgrp"] for st in stats.values() if st["session"] == sid}
    if fg not in groups:
        raise refuse(info, "tty", f"pty {index}: foreground process group {fg} is not one of the dump's in "
                     f"session {sid} ({', '.join(map(str, sorted(groups)))})")
    return sid


def _devtty(info, ctx) -> str:
    """/dev/tty opened by the process: its controlling terminal under
    another name. Its terminal a pair of the dump: reopened by the restored
    process (_reopen_devtty). Its master outside (a shell job): reopened
    by that name in ckpt, which must then share the terminal (restore
    --tty). Refused otherwise."""
    index = ctty_index(info.pid)
    if index is None:
        raise refuse(info, "tty", "/dev/tty of a process with no pseudo-terminal as controlling terminal")
    if (index in _ends(ctx) and _ends(ctx)[index]["master"]) or _tree_master(ctx, index):
        # Reopened by the restored process itself once the pair is its
        # controlling terminal again (finish): /dev/tty is whatever
        # terminal the opener has. Its open file description is the
        # process's own: one shared with another member (inherited through
        # fork) could only be reopened as two.
        from ..pidfd import KCMP_FILE, kcmp
        for pid, fd, link in _tree_fds(ctx, info.pid):
            try:
                same = link == "/dev/tty" and kcmp(info.pid, pid, KCMP_FILE, info.fd, fd) == 0
            except Exception:    # noqa: BLE001 - gone meanwhile: nothing shared
                same = False
            if same:
                raise refuse(info, "tty", f"/dev/tty naming pty {index}, one open file description with pid {pid} "
                             f"(fd {fd}): each process reopens its own, which would make two")
        return f"/dev/tty (its controlling terminal /dev/pts/{index}, a pair of the dump: reopened by the process)"
    if not getattr(ctx.options, "shell_job", False):
        raise refuse(info, "tty-outside", f"/dev/tty, naming /dev/pts/{index} whose master is outside the dump: "
                     "dump with --shell-job and restore with --tty PATH")
    return f"/dev/tty (its controlling terminal /dev/pts/{index}: reopened as ckpt's, which restore --tty must be)"


def classify(info, ctx) -> str:
    if _is_devtty(info):
        return _devtty(info, ctx)
    index = _index(info)
    pair = _pair(info, ctx)
    if pair["outside"]:
        if not getattr(ctx.options, "shell_job", False):
            raise refuse(info, "tty-outside", f"pty slave /dev/pts/{index} whose master is {pair['master_where']} "
                         "(outside the dump): dump with --shell-job and restore with --tty PATH")
        return f"pty slave /dev/pts/{index} (master outside: reopened on the terminal given to restore --tty)"
    side = "master" if _tty.is_master(info.rdev) else "slave"
    q = ", ".join(f"{n} bytes queued {w}" for n, w in ((pair["out_len"], "for the master"),
                                                      (pair["in_len"], "for the slave")) if n)
    return (f"pty {side} of pty {index}" + (", controlling terminal" if pair["ctty"] else "")
            + (f", {q}" if q else ""))


def dump(info, ctx) -> dict:
    classify(info, ctx)
    if _is_devtty(info):
        with pidfd.target_fd(info.pid, info.fd) as dup:
            termios = _tty.get_termios(dup)
        st = _stat_fields(info.pid)
        index = ctty_index(info.pid)
        if (index in _ends(ctx) and _ends(ctx)[index]["master"]) or _tree_master(ctx, index):
            return {"tty": "devtty", "index": index, "outside": False, "ctty": True}
        return {"tty": "devtty", "index": index, "outside": True, "ctty": True,
                "termios": termios.hex(), "fg_own": st["tpgid"] == st["pgrp"]}
    pair = _pair(info, ctx)
    index = pair["index"]
    if pair["outside"]:
        with pidfd.target_fd(info.pid, info.fd) as dup:
            termios = _tty.get_termios(dup)
        ctty = ctty_index(info.pid) == index
        return {"tty": "slave", "index": index, "outside": True, "termios": termios.hex(), "ctty": ctty,
                "fg_own": ctty and _stat_fields(info.pid)["tpgid"] == _stat_fields(info.pid)["pgrp"]}
    if _tty.is_master(info.rdev):
        rec = {k: v for k, v in pair.items() if not k.startswith("_")}
        rec["tty"] = "master"
        rec.update(_queues(info, ctx, pair))
        return rec
    # "ctty": the holder is the session leader that makes it its controlling terminal again
    return {"tty": "slave", "index": index, "outside": False, "ctty": pair["ctty"] and pair.get("sid") == info.pid}


def _queues(info, ctx, pair: dict) -> dict:
    """Both queues drained, written to the image and put back into the
    original at once (it is frozen: nothing else reads them), then counted
    again: a difference is an error, the dump fails and says so. In
    canonical mode the slave's queue is always taken (a line being typed
    does not show in FIONREAD: _tty.take_canonical)."""
    out: dict = {"out": None, "in": None}
    termios = bytes.fromhex(pair["termios"])
    canon = _tty.canonical(termios)
    if not (pair["out_len"] or pair["in_len"] or canon):
        return out
    (mpid, mfd_n), (spid, sfd_n) = pair["_master"], pair["_slave"]
    packet = bool(pair["packet"])
    lines, partial, inq = [], b"", b""
    with pidfd.target_fd(mpid, mfd_n) as mfd, pidfd.target_fd(spid, sfd_n) as sfd:
        try:
            _tty.settle(sfd)      # input the master wrote is processed (and echoed) before the output is taken
            outq = _tty.read_queue(mfd, packet)
            back_out = _tty.inject_output(mfd, sfd, outq, termios)
            if canon:
                lines, partial = _tty.take_canonical(mfd, sfd, termios, packet)
                back_in = _tty.put_canonical(mfd, sfd, termios, lines, partial, packet)
                want_in = sum(len(x) for x in lines)
            else:
                inq = _tty.read_queue(sfd) if pair["in_len"] else b""
                if packet and _tty.fields(termios)["iflag"] & _tty.IXON and \
                        any(c in inq for c in _tty.flow_chars(termios)):
                    _tty.inject_input(mfd, sfd, inq, termios, True)
                    raise refuse(info, "tty-queued", f"pty {pair['index']}: flow-control characters queued for "
                                 "the slave in packet mode with IXON")
                back_in = _tty.inject_input(mfd, sfd, inq, termios, packet)
                want_in = len(inq)
        except _tty.Unexact as e:
            raise refuse(info, "tty-queued", f"pty {pair['index']}: {e}") from None
        except OSError as e:
            raise EngineError(f"pty {pair['index']}: moving its queued bytes: {e.strerror or e}",
                              pid=info.pid, errno=e.errno or None) from e
    if back_out != len(outq) or back_in != want_in:
        raise EngineError(f"pty {pair['index']}: queues hold {back_out}/{back_in} bytes after being put back, "
                          f"{len(outq)}/{want_in} were read", pid=info.pid)
    for name, data in (("out", outq), ("in", inq)):
        if data:
            out[name] = f"fds/tty-{pair['index']}-{name}"
            ctx.image.write_bytes(out[name], data)
        out[f"{name}_len"] = len(data)
    if canon:
        out["in_lines"] = [x.hex() for x in lines]
        out["in_partial"] = partial.hex()
        out["in_len"] = want_in
    return out


# -- restore ------------------------------------------------------------------

def _records(ctx) -> List[dict]:
    # In a process tree, every member's (engine/tree_restore.py): a pair's
    # master and slaves may be held by different members.
    return getattr(ctx, "tree_records", None) or ctx.records or []


def _master_rec(rec: dict, ctx) -> Optional[dict]:
    for r in _records(ctx):
        if r.get("kind") == KIND and r.get("tty") == "master" and r.get("index") == rec.get("index") \
                and not is_follower(r) and not r.get("outside"):
            return r
    return None


def _slave_recs(index: int, ctx) -> List[dict]:
    return [r for r in _records(ctx) if r.get("kind") == KIND and r.get("tty") == "slave"
            and r.get("index") == index and not is_follower(r) and not r.get("outside")]


def _image_of(m: dict, ctx):
    """Where the master's queue files are: its member's image directory."""
    return m.get("_image") or ctx.image


def validate(rec: dict, ctx) -> None:
    if rec.get("tty") not in ("master", "slave", "devtty") or not isinstance(rec.get("index"), int):
        raise refuse_rec(rec, ctx, "image-invalid", "tty record malformed")
    if rec["tty"] == "devtty":
        if rec.get("outside", True):
            _outside_tty(rec, ctx)
        elif _master_rec(rec, ctx) is None:
            raise refuse_rec(rec, ctx, "image-invalid", f"/dev/tty naming pty {rec['index']}, whose master "
                             "record is missing")
        return
    if rec.get("outside"):
        if rec["tty"] != "slave" or not isinstance(rec.get("termios"), str):
            raise refuse_rec(rec, ctx, "image-invalid", "outside tty record malformed")
        _outside_tty(rec, ctx)
        return
    m = rec if rec["tty"] == "master" else _master_rec(rec, ctx)
    if m is None or not isinstance(m.get("termios"), str) or not isinstance(m.get("winsize"), list):
        raise refuse_rec(rec, ctx, "image-invalid", f"the record of pty {rec['index']}'s master is missing")
    for name in ("out", "in"):
        if m.get(name):
            _image_of(m, ctx).path(m[name])
    if _taken(rec["index"]):
        raise refuse_rec(rec, ctx, "tty", f"pty index {rec['index']} is taken (/dev/pts/{rec['index']} exists): "
                         "the restored pair would get another index, which the process may have recorded")


def _taken(index: int) -> bool:
    """/dev/pts/N exists (for a moment after the dumped process died, its
    own node may linger: wait a little)."""
    deadline = time.monotonic() + INDEX_WAIT
    while os.path.exists(f"/dev/pts/{index}"):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.01)
    return False


def _outside_tty(rec: dict, ctx) -> str:
    """The terminal an outside slave is reopened on (restore --tty);
    raises tty-outside."""
    want = getattr(ctx.options, "tty", None)
    if not want:
        raise refuse_rec(rec, ctx, "tty-outside", f"the process ran on /dev/pts/{rec['index']}, whose master was "
                         "outside the dump: restore with --tty PATH (or --tty inherit)")
    path = tty_path(want)
    try:
        st = os.stat(path)
    except OSError as e:
        raise refuse_rec(rec, ctx, "tty-outside", f"--tty {want}: {e.strerror}") from None
    if not stat.S_ISCHR(st.st_mode) or _tty.slave_index(st.st_rdev) is None and \
            os.major(st.st_rdev) not in (4, 5):
        raise refuse_rec(rec, ctx, "tty-outside", f"--tty {path} is not a terminal")
    if rec.get("ctty"):
        mine = _stat_fields(os.getpid())["tty_nr"]
        if mine != (os.major(st.st_rdev) << 8 | (os.minor(st.st_rdev) & 0xFF) | (os.minor(st.st_rdev) & ~0xFF) << 12):
            raise refuse_rec(rec, ctx, "tty-outside", f"it was the process's controlling terminal, and {path} is "
                             "not ckpt's (the restored process shares ckpt's session and its terminal)")
    return path


def tty_path(option: str) -> str:
    """The terminal restore --tty names."""
    return _inherit_path() if option == "inherit" else option


def wait_foreground(pgid: int, path: str, root: int = 0) -> int:
    """ckpt restore of a foreground shell job (one process, or a tree's
    foreground group: a pipeline, a program and its children): wait, as
    its parent (the child subreaper: members orphaned on the way come to
    ckpt), until no process of group `pgid` is left, as a shell's `fg`
    waits for the whole job; then take the terminal `path` back for ckpt's
    group (the shell that ran ckpt takes it from there).

    When every process of the group is stopped (^Z), ckpt takes the
    terminal back and stops itself (SIGTSTP), so the shell that ran it
    sees a stopped job, as sudo(8) does: its `fg` (SIGCONT, the terminal
    given to ckpt's group) gives the terminal to the job again and
    continues it; `bg` continues it in the background. ckpt returning
    instead would orphan the stopped group, and the kernel would send it
    SIGHUP and SIGCONT (kill_orphaned_pgrp): most programs die of that.
    With no job-control shell above ckpt (its own group orphaned: the
    kernel drops a SIGTSTP sent there) ckpt keeps waiting, the job stopped
    in the foreground until something continues it.

    Returns the job's exit status as a shell gives it (sudo(8) does the
    same): the restored process `root`'s exit code, or 128 + the signal
    that killed it; 0 when ckpt did not reap it (it was never ckpt's child
    or was waited for elsewhere)."""
    import signal as _signal
    old = _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGCHLD, _signal.SIGTTOU})
    status = {}
    try:
        while True:
            _reap_children(status)
            procs = _proc_table()
            group = [p for p, (_, pg, _, state) in procs.items() if pg == pgid and state not in "ZX"]
            if not group:
                break
            if all(procs[p][3] == "T" for p in group) and not _orphaned(os.getpgrp(), procs):
                _suspend(pgid, path)
                continue
            # Every member ckpt's child: each exit or stop sends ckpt a
            # SIGCHLD. A member's child (in the group too) only tells its
            # parent: looked at again every 0.2 s.
            mine = all(procs[p][0] == os.getpid() for p in group)
            _signal.sigtimedwait({_signal.SIGCHLD}, 3600 if mine else 0.2)
        # A member that died after the reaping above and before /proc was
        # read shows as a zombie (left out of the group): reaped now, or
        # ckpt returned 0 for a job killed by a signal (seen in CI, 1 run
        # in ~5 under load).
        _reap_children(status)
        _take_back(path, pgid)
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old)
    return _shell_status(status.get(root))


def _reap_children(status: Dict[int, int]) -> None:
    """Every exited child of ckpt reaped (members orphaned on the way come
    to ckpt, the subreaper), its wait status kept in `status`."""
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid <= 0:
            return
        status[pid] = st


def _shell_status(st) -> int:
    if st is None:
        return 0
    if os.WIFSIGNALED(st):
        return 128 + os.WTERMSIG(st)
    return os.WEXITSTATUS(st) if os.WIFEXITED(st) else 0


def _proc_table() -> Dict[int, tuple]:
    """{pid: (ppid, pgrp, session, state)} of every process /proc shows."""
    out: Dict[int, tuple] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
            out[int(name)] = (int(rest[1]), int(rest[2]), int(rest[3]), rest[0].decode())
        except (OSError, IndexError, ValueError):
            continue
    return out


def _orphaned(pgrp: int, procs: Dict[int, tuple]) -> bool:
    """No process of group `pgrp` has its parent in another group of the
    same session (the kernel's orphaned process group: no shell there to
    continue it, and a SIGTSTP sent there is dropped)."""
    for ppid, pg, sid, state in procs.values():
        parent = procs.get(ppid)
        if pg == pgrp and state not in "ZX" and parent is not None and parent[1] != pgrp and parent[2] == sid:
            return False
    return True


def _suspend(pgid: int, path: str) -> None:
    """The job stopped: ckpt stops too, for the shell that ran it; once
    continued, the job is continued, in the foreground if ckpt is."""
    import signal as _signal
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.tcsetpgrp(fd, os.getpgrp())            # SIGTTOU blocked (wait_foreground)
        os.kill(os.getpid(), _signal.SIGTSTP)     # stopped here until the shell's fg or bg
        if os.tcgetpgrp(fd) == os.getpgrp():      # fg: the shell gave ckpt the terminal
            os.tcsetpgrp(fd, pgid)
        os.killpg(pgid, _signal.SIGCONT)
    except OSError:
        pass
    finally:
        os.close(fd)


def _take_back(path: str, pgid: int) -> None:
    """The terminal back to ckpt's group once the job is gone, unless a
    live group other than the job's holds it (ckpt continued in the
    background: the shell's own group has it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        held = os.tcgetpgrp(fd)
        if held != pgid and held != os.getpgrp():
            try:
                os.killpg(held, 0)
                return
            except ProcessLookupError:
                pass
            except PermissionError:
                return
        os.tcsetpgrp(fd, os.getpgrp())
    except OSError:
        pass
    finally:
        os.close(fd)


def _inherit_path() -> str:
    try:
        return os.ttyname(0)
    except OSError:
        return "/dev/stdin"


def restore(rec: dict, ctx) -> int:
    try:
        if rec.get("outside"):
            return _restore_outside(rec, ctx)
        if rec["tty"] == "devtty":
            # A stand-in until the process reopens /dev/tty itself (finish).
            return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        built = ctx.shared.get(f"tty:built:{rec['index']}")
        if built is None:
            built = _build(_master_rec(rec, ctx), ctx)
            ctx.shared[f"tty:built:{rec['index']}"] = built
        return with_status_flags(rec, ctx, built.pop(id(rec)))
    except OSError as e:
        raise failed(rec, ctx, f"rebuilding pty {rec['index']}", e) from e


def _restore_outside(rec: dict, ctx) -> int:
    path = _outside_tty(rec, ctx)
    if rec["tty"] == "devtty":
        path = "/dev/tty"         # ckpt's controlling terminal, checked to be the --tty one
    fd = os.open(path, (rec["flags"] & (os.O_ACCMODE | os.O_NONBLOCK | os.O_APPEND)) | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not ctx.shared.get("tty:outside-termios"):
            _tty.set_termios(fd, bytes.fromhex(rec["termios"]))
            ctx.shared["tty:outside-termios"] = True
    except OSError:
        os.close(fd)
        raise
    return fd


def _open_index(index: int, ctx, mrec: dict) -> int:
    """A new master with pty index `index`: devpts allocates the lowest
    free index (ida_alloc_max in devpts_new_index), so the lower ones are
    held open until it comes. Raises the `tty` refusal."""
    # The dumped pair's index is given back by a work item after its last
    # close (release_one_tty -> pty_cleanup -> devpts_kill_index), a little
    # after its /dev/pts node went (pty_close): while the node is gone, wait.
    deadline = time.monotonic() + INDEX_WAIT
    while True:
        held: List[int] = []
        try:
            for _ in range(min(index + 1, MAX_INDEX_TRIES)):
                fd = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
                got = _tty.ioc_int(fd, _tty.TIOCGPTN)
                if got == index:
                    return fd
                held.append(fd)
                if got > index:
                    break
        finally:
            for fd in held:
                os.close(fd)
        if os.path.exists(f"/dev/pts/{index}") or time.monotonic() > deadline or index >= MAX_INDEX_TRIES:
            raise refuse_rec(mrec, ctx, "tty", f"pty index {index} is taken (or beyond {MAX_INDEX_TRIES} free "
                             "ones below it): the pair would get another index")
        time.sleep(0.01)


def _peer(mfd: int, flags: int) -> int:
    """The slave opened from the master (TIOCGPTPEER, 4.13+). Its flags go
    to the file as given (dentry_open: no O_LARGEFILE forced, O_CLOEXEC
    kept in f_flags, unlike open(2)), so they are given as open(2) leaves
    them, and close-on-exec is set on the fd afterwards."""
    fd = _tty.ioc_call(mfd, _tty.TIOCGPTPEER, flags | os.O_NOCTTY | O_LARGEFILE)
    os.set_inheritable(fd, False)
    return fd


def _build(m: dict, ctx) -> Dict[int, int]:
    """Master and slaves of one pair (of every member of a tree): id of
    the record -> restorer fd."""
    index = m["index"]
    mfd = _open_index(index, ctx, m)
    out = {id(m): mfd}
    try:
        _tty.set_int(mfd, _tty.TIOCSPTLCK, 0)
        name = f"/dev/pts/{index}"
        n = m["node"]
        os.chown(name, n["uid"], n["gid"])
        os.chmod(name, n["mode"])
        termios = bytes.fromhex(m["termios"])
        _tty.set_termios(mfd, termios)
        _tty.set_winsize(mfd, m["winsize"])
        if m["packet"]:
            _tty.set_int(mfd, _tty.TIOCPKT, 1)
        for r in _slave_recs(index, ctx):
            out[id(r)] = _peer(mfd, r["flags"] & (os.O_ACCMODE | os.O_NONBLOCK | os.O_APPEND))
        sfd = _peer(mfd, os.O_RDWR)
        try:
            outq = _image_of(m, ctx).read_bytes(m["out"]) if m.get("out") else b""
            inq = _image_of(m, ctx).read_bytes(m["in"]) if m.get("in") else b""
            got_out = _tty.inject_output(mfd, sfd, outq, termios)
            if _tty.canonical(termios):
                try:
                    got_in = _tty.put_canonical(mfd, sfd, termios, [bytes.fromhex(x) for x in m.get("in_lines", [])],
                                                bytes.fromhex(m.get("in_partial", "")), bool(m["packet"]))
                except _tty.Unexact as e:
                    raise refuse_rec(m, ctx, "tty-queued", f"pty {index}: {e}") from None
            else:
                got_in = _tty.inject_input(mfd, sfd, inq, termios, bool(m["packet"]))
            if got_out != m.get("out_len", 0) or got_in != m.get("in_len", 0):
                raise refuse_rec(m, ctx, "tty-queued", f"pty {index}: {got_out}/{got_in} bytes queued after the "
                                 f"refill, {m.get('out_len', 0)}/{m.get('in_len', 0)} dumped")
            if m.get("excl"):
                _tty.ioc_call(sfd, _tty.TIOCEXCL)
        finally:
            os.close(sfd)
        if m.get("locked"):
            _tty.set_int(mfd, _tty.TIOCSPTLCK, 1)
        back = _tty.get_termios(mfd)
        if back != termios or list(_tty.get_winsize(mfd)) != m["winsize"]:
            raise refuse_rec(m, ctx, "tty", f"pty {index}: termios or window size read back differently")
    except BaseException:
        for fd in out.values():
            os.close(fd)
        raise
    return out


def finish(rec: dict, ctx, task) -> None:
    """The controlling terminal, from inside the restored session leader:
    TIOCSCTTY on its slave fd, then the foreground process group."""
    if rec.get("outside"):
        if rec.get("fg_own") and not ctx.shared.get("tty:foreground-set"):
            # it was its terminal's foreground job: so it is on the new one
            # (the restorer is in ckpt's group, the foreground one, so may);
            # its group: in a tree, a member other than the group's leader may come first
            fd = os.open(tty_path(ctx.options.tty), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            try:
                os.tcsetpgrp(fd, os.getpgid(task.pid))
            finally:
                os.close(fd)
            ctx.shared["tty:foreground-set"] = True
        return
    if rec.get("tty") == "devtty":
        _reopen_devtty(rec, ctx, task)
        return
    if rec.get("tty") != "slave" or not rec.get("ctty"):
        return
    m = _master_rec(rec, ctx)
    task.call("ioctl", rec["fd"], _tty.TIOCSCTTY, 0)
    if m and m.get("fg"):
        addr = task.scratch
        task.write_mem(addr, int(m["fg"]).to_bytes(4, "little", signed=True))
        task.call("ioctl", rec["fd"], _tty.TIOCSPGRP, addr)


def session_terminals(members: List[dict], fdrecs_of: Dict[int, List[dict]]) -> Dict[int, dict]:
    """A process tree's controlling terminals (engine/tree_restore.py):
    {session leader pid: {"index", "fg", "holder": (pid, fd)}} for each pty
    of the image that is a session's controlling terminal. The leader makes
    it so right after its setsid(), before it forks (the members of its
    session inherit it: copy_signal; a process other than the leader can
    get it no other way), with TIOCSCTTY on the slave fd `holder` (an fd
    the restorer opened for any member: every member holds all of them
    until its fds are installed); the foreground group once every group
    exists. Raises Refusal(image-invalid)."""
    by_pid = {m["pid"]: m for m in members}
    recs = [(pid, r) for pid, rs in fdrecs_of.items() for r in rs]
    out: Dict[int, dict] = {}
    for pid, r in recs:
        if r.get("kind") != KIND or r.get("tty") != "master" or r.get("outside") or not r.get("ctty") \
                or "dup_of" in r or "ofd_of" in r:
            continue
        sid, fg, index = r.get("sid", pid), r.get("fg"), r.get("index")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (sid, index)) or \
                not (fg is None or isinstance(fg, int) and not isinstance(fg, bool)):
            raise Refusal("image-invalid", f"pty {index!r}: session {sid!r} or foreground group {fg!r} malformed",
                          pid=pid)
        lead = by_pid.get(sid)
        if lead is None or "zombie" in lead or lead["sid"] != sid or sid in out:
            raise Refusal("image-invalid", f"pty {index}: controlling terminal of session {sid}, which no live "
                          "session leader of the tree leads (or of another pty too)", pid=pid)
        if fg is not None and fg not in {m["pgid"] for m in members if m["sid"] == sid}:
            raise Refusal("image-invalid", f"pty {index}: foreground group {fg} is none of session {sid}'s",
                          pid=pid)
        holder = next(((p, s["fd"]) for p, s in recs if s.get("kind") == KIND and s.get("tty") == "slave"
                       and s.get("index") == index and not s.get("outside")), None)
        if holder is None:
            raise Refusal("image-invalid", f"pty {index}: no record of its slave", pid=pid)
        out[sid] = {"index": index, "fg": fg, "holder": holder}
    return out


def _reopen_devtty(rec: dict, ctx, task) -> None:
    """/dev/tty opened by the restored process itself, over the stand-in
    at its fd number: its controlling terminal is the restored pair by now
    (a tree member's since its session leader's setsid, engine/tree_restore.py;
    a single session leader's once its slave's finish ran: done here first,
    TIOCSCTTY again being a no-op). Flags as dumped (open(2) adds
    O_LARGEFILE as it did), close-on-exec as dumped."""
    for r in ctx.records or []:
        if r.get("kind") == KIND and r.get("tty") == "slave" and r.get("ctty") and not r.get("outside") \
                and r.get("index") == rec["index"]:
            finish(r, ctx, task)
            break
    flags = rec["flags"] & (os.O_ACCMODE | os.O_NONBLOCK | os.O_APPEND) | os.O_NOCTTY | os.O_CLOEXEC
    reopen_in_process(rec, ctx, task, "/dev/tty", flags, f"pty {rec['index']}")
