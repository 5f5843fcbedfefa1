"""A pty pair split between members of a dumped tree (engine/fds/tty.py,
engine/tree_restore.py), end to end on real processes: a driver (the
root, like script(1)) holds the master and a slave fd, its child leads a
session whose controlling terminal is the slave, and the grandchild is the
terminal's foreground process group. Bytes wait both ways, termios, window
size and exclusive mode are changed. After dump and restore: the same
index, every member's controlling terminal and ttyname, the foreground
group, termios, each queued byte arriving once, keys typed into the master
reaching the grandchild and its output (written to the /dev/tty fd it
holds, reopened by the restored process) reaching the driver. And the
boundaries: the same session dumped without the driver (master outside)
is refused `tty-outside`, naming the driver; /dev/tty shared by two
members, and a member without its leader's terminal, are refused `tty`.
Every process judges itself."""

from __future__ import annotations

import json
import os
import time

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal, Refusals
from engine_core_support import procs, wait_for  # noqa: F401
from fds_support import ask_verdict, dump_restore, start_worker

WORKER = r'''
import fcntl, json, os, signal, struct, sys, termios, time
DIR, MODE = sys.argv[1], sys.argv[2]
TIOCGPTN, TIOCSPTLCK, TIOCGEXCL = 0x80045430, 0x40045431, 0x80045440
IN = b"typed\rbytes \x03\x7f and more\n" * 40      # for the grandchild (ICRNL on input: \r -> \n)
OUT = b"printed\nline\n" * 30                      # for the driver (ONLCR: \n -> \r\n)
KEYS = b"after the restore\r"

def ioc_int(fd, req):
    return struct.unpack("i", fcntl.ioctl(fd, req, b"\0" * 4))[0]

def fionread(fd):
    return ioc_int(fd, termios.FIONREAD)

def publish(name, obj):
    with open(os.path.join(DIR, name + ".tmp"), "w") as f:
        json.dump(obj, f)
    os.rename(os.path.join(DIR, name + ".tmp"), os.path.join(DIR, name))

def wait_file(name, seconds=20):
    end = time.monotonic() + seconds
    while not os.path.exists(os.path.join(DIR, name)):
        if time.monotonic() > end:
            return None
        time.sleep(0.02)
    with open(os.path.join(DIR, name)) as f:
        return json.load(f)

def read_exactly(fd, n, seconds=5):
    out = b""
    end = time.monotonic() + seconds
    while len(out) < n and time.monotonic() < end:
        if fionread(fd):
            out += os.read(fd, n - len(out))
        else:
            time.sleep(0.01)
    return out

m = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
fcntl.ioctl(m, TIOCSPTLCK, struct.pack("i", 0))
index = ioc_int(m, TIOCGPTN)
name = f"/dev/pts/{index}"
drv_slave = os.open(name, os.O_RDWR | os.O_NOCTTY)     # script(1) keeps one too
leader = os.fork()
if leader == 0:
    # the session leader: its controlling terminal is the slave
    os.close(m); os.close(drv_slave)
    os.setsid()
    if MODE == "forked-before-ctty":
        early = os.fork()                               # in the session, without a controlling terminal
        if early == 0:
            while True:
                time.sleep(0.05)
        publish("early", {"pid": early})
    s = os.open(name, os.O_RDWR)                        # no O_NOCTTY: becomes the controlling terminal
    for fd in (0, 1, 2):
        os.dup2(s, fd)
    os.close(s)
    attrs = termios.tcgetattr(0)
    attrs[3] &= ~(termios.ICANON | termios.ECHO)
    attrs[1] |= termios.ONLCR
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VINTR] = 7
    termios.tcsetattr(0, termios.TCSANOW, attrs)
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    fcntl.ioctl(0, termios.TIOCEXCL)
    if MODE == "shared-devtty":
        os.dup2(os.open("/dev/tty", os.O_RDWR), 8)      # inherited by the job: one open file for both
    gate_r, gate_w = os.pipe()
    fg = os.fork()
    if fg == 0:
        # the foreground job
        os.setpgid(0, 0)
        os.read(gate_r, 1)                              # until it is the foreground group
        devtty = os.open("/dev/tty", os.O_WRONLY)       # its controlling terminal by that name
        os.dup2(devtty, 9); os.close(devtty)
        devtty_fl = fcntl.fcntl(9, fcntl.F_GETFL)
        os.write(1, OUT)
        truth = {"attrs": termios.tcgetattr(0)}

        def verify(*_):
            out = {}
            try:
                out["ttyname"] = os.ttyname(0) == name and os.ttyname(1) == name
                out["ctty"] = os.open("/dev/tty", os.O_RDWR) >= 0
                out["foreground"] = os.tcgetpgrp(0) == os.getpgrp() == os.getpid()
                out["attrs"] = termios.tcgetattr(0) == truth["attrs"]
                out["winsize"] = struct.unpack("HHHH", fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8)))[:2] == (33, 111)
                out["excl"] = ioc_int(0, TIOCGEXCL) == 1
                want = IN.replace(b"\r", b"\n") + KEYS.replace(b"\r", b"\n")
                got = read_exactly(0, len(want))
                time.sleep(0.2)
                out["input_once"] = got == want and fionread(0) == 0 or repr((len(got), len(want), fionread(0)))
                out["devtty"] = (os.readlink("/proc/self/fd/9"), os.major(os.fstat(9).st_rdev),
                                 fcntl.fcntl(9, fcntl.F_GETFL)) == ("/dev/tty", 5, devtty_fl)
                os.write(9, b"bye\n")                  # through /dev/tty: the restored pair's master gets it
            except Exception as e:
                out["error"] = repr(e)
            publish("fg.json", out)

        signal.signal(signal.SIGUSR1, verify)
        publish("fg-ready", {"pid": os.getpid()})
        while True:
            time.sleep(0.05)
    os.setpgid(fg, fg)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    os.tcsetpgrp(0, fg)
    os.write(gate_w, b"x")
    while True:
        time.sleep(0.05)
got = wait_file("fg-ready")
fg = got["pid"]
os.write(m, IN)
time.sleep(0.3)

def verify(*_):
    out = {}
    try:
        out["index"] = ioc_int(m, TIOCGPTN) == index and os.path.exists(name)
        want = OUT.replace(b"\n", b"\r\n")
        n = fionread(m)
        got = read_exactly(m, len(want))
        out["output_once"] = (n, got) == (len(want), want) or repr((n, len(want), got[:40]))
        os.write(m, KEYS)
        os.kill(fg, signal.SIGUSR1)
        theirs = wait_file("fg.json")
        out.update({f"fg_{k}": v for k, v in (theirs or {"verdict": "none"}).items()})
        out["after"] = read_exactly(m, 5) == b"bye\r\n"
    except Exception as e:
        out["error"] = repr(e)
    publish("verdict.json", out)

signal.signal(signal.SIGUSR1, verify)
publish("ready", {"index": index, "leader": leader, "fg": fg})
while True:
    time.sleep(0.05)
'''

ALL_TRUE = {k: True for k in ("index", "output_once", "fg_ttyname", "fg_ctty", "fg_foreground", "fg_attrs",
                              "fg_winsize", "fg_excl", "fg_input_once", "fg_devtty", "after")}


def _stat(pid: int) -> dict:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return {"ppid": int(rest[1]), "pgrp": int(rest[2]), "session": int(rest[3]), "tty_nr": int(rest[4]),
            "tpgid": int(rest[5])}


def _start(procs, tmp_path, mode="plain"):
    p, ready = start_worker(procs, tmp_path, [str(tmp_path), mode], WORKER, "the pty driver")
    for pid in (ready["leader"], ready["fg"]):
        procs.adopt(pid)
    time.sleep(0.3)
    return p, ready


def test_pair_split_across_the_tree_is_restored_with_its_session(procs, tmp_path):
    p, ready = _start(procs, tmp_path)
    leader, fg = ready["leader"], ready["fg"]
    before = {pid: _stat(pid) for pid in (p.pid, leader, fg)}
    assert before[leader]["tty_nr"] and before[fg]["tty_nr"] == before[leader]["tty_nr"]
    assert before[leader]["tpgid"] == fg and before[p.pid]["tty_nr"] == 0
    dump_restore(procs, p, str(tmp_path / "img"))
    for pid in (leader, fg):
        procs.adopt(pid)
    after = {pid: _stat(pid) for pid in (p.pid, leader, fg)}
    assert after == before            # parents, groups, sessions, controlling terminals, foreground group
    assert ask_verdict(p.pid, tmp_path) == ALL_TRUE


def test_check_names_the_split_pair_as_restorable(procs, tmp_path):
    p, ready = _start(procs, tmp_path)
    out = check(p.pid, Options())
    assert out["ok"], out["refusals"]
    said = " ".join(i["detail"] for i in out["items"])
    assert f"pty master of pty {ready['index']}" in said and f"pty slave of pty {ready['index']}, controlling" in said
    assert f"whose leader {ready['leader']} is in the tree" in said


def test_the_session_without_its_driver_is_refused_tty_outside(procs, tmp_path):
    """The boundary: dumping the session leader's subtree leaves the master
    (the driver) outside: refused `tty-outside`, naming the driver; nothing
    is taken from the queues."""
    p, ready = _start(procs, tmp_path)
    leader = ready["leader"]
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(leader, str(tmp_path / "img"), Options())
    refusals = getattr(ei.value, "refusals", [ei.value])
    assert {r.reason for r in refusals} == {"tty-outside"}, [r.message for r in refusals]
    assert any(f"held by pid {p.pid}" in r.detail for r in refusals)
    assert not os.path.exists(tmp_path / "img")
    assert p.poll() is None and os.path.exists(f"/proc/{leader}")
    assert ask_verdict(p.pid, tmp_path) == ALL_TRUE       # the unharmed tree still has both queues intact


def test_dev_tty_shared_between_members_is_refused(procs, tmp_path):
    """/dev/tty is reopened by each restored process on its own: one open
    file description two members share (inherited through fork) would come
    back as two, so it is refused `tty`, naming the other member."""
    p, ready = _start(procs, tmp_path, "shared-devtty")
    out = check(p.pid, Options())
    tty = [r for r in out["refusals"] if r["reason"] == "tty"]
    assert {r["reason"] for r in out["refusals"]} == {"tty"}, out["refusals"]
    assert any("one open file description with pid" in r["detail"] for r in tty), tty


def test_member_without_its_leaders_terminal_is_refused(procs, tmp_path):
    """A member forked before its session leader took the terminal has
    none; a restore would give it the leader's (it is forked after the
    leader's TIOCSCTTY): refused `tty`, naming the leader."""
    p, ready = _start(procs, tmp_path, "forked-before-ctty")
    early = json.loads((tmp_path / "early").read_text())["pid"]
    procs.adopt(early)
    out = check(p.pid, Options())
    assert {r["reason"] for r in out["refusals"]} == {"tty"}, out["refusals"]
    assert all(r["pid"] == early and f"session leader {ready['leader']}'s is" in r["detail"]
               for r in out["refusals"]), out["refusals"]


def test_session_terminal_records_are_checked_before_any_process_exists():
    """tree.json and the pty records must agree: the terminal's session is
    led by a live member, its foreground group is one of that session's,
    a slave record exists; a record that says otherwise is image-invalid."""
    from engine.fds.tty import session_terminals
    members = [{"pid": 10, "ppid": 1, "sid": 10, "pgid": 10}, {"pid": 11, "ppid": 10, "sid": 11, "pgid": 12},
               {"pid": 12, "ppid": 11, "sid": 11, "pgid": 12}]
    master = {"kind": "tty", "tty": "master", "fd": 3, "index": 4, "outside": False, "ctty": True, "sid": 11, "fg": 12}
    slave = {"kind": "tty", "tty": "slave", "fd": 0, "index": 4, "outside": False, "ctty": True}
    got = session_terminals(members, {10: [master], 11: [slave], 12: []})
    assert got == {11: {"index": 4, "fg": 12, "holder": (11, 0)}}
    for bad, recs in ((dict(master, sid=12), [slave]), (dict(master, fg=10), [slave]), (dict(master, fg="12"), [slave]),
                      (master, [])):
        with pytest.raises(Refusal) as ei:
            session_terminals(members, {10: [bad], 11: recs, 12: []})
        assert ei.value.reason == "image-invalid"


def test_tree_restore_names_the_pty_kind():
    """A tree restore looks for controlling terminals (fds/tty.py) only when
    some fd record is of the pty kind, which it names without importing
    fds/tty: the same name."""
    from engine import tree_restore
    from engine.fds import tty
    assert tree_restore.TTY_KIND == tty.KIND
