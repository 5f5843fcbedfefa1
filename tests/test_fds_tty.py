"""Pseudo-terminals end to end (engine.dump + engine.restore on a real
process): a session leader holding both ends of a pty that is its
controlling terminal comes back with the same index, termios, window
size, packet mode, node mode, controlling terminal and foreground group,
and both queues byte for byte; what cannot be exact is refused by name,
and a refused or --leave-running dump leaves every queued byte in place.
The worker derives its ground truth from what it did itself."""

from __future__ import annotations

import json
import os
import signal

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import procs, python_exe, wait_for  # noqa: F401
from fds_support import dump_restore

WORKER = r'''
import fcntl, json, os, signal, struct, sys, termios, time
DIR, MODE = sys.argv[1], sys.argv[2]
TIOCGPTN, TIOCSPTLCK, TIOCPKT, TIOCGPKT = 0x80045430, 0x40045431, 0x5420, 0x80045438
def ioc_int(fd, req):
    return struct.unpack("i", fcntl.ioctl(fd, req, b"\0" * 4))[0]
m = os.open("/dev/ptmx", os.O_RDWR)
fcntl.ioctl(m, TIOCSPTLCK, struct.pack("i", 0))
index = ioc_int(m, TIOCGPTN)
s = os.open(f"/dev/pts/{index}", os.O_RDWR)          # no O_NOCTTY: our controlling terminal
os.dup2(m, 600); os.dup2(s, 601); os.dup2(s, 602); os.close(m); os.close(s)
m, s = 600, 601
os.chmod(f"/dev/pts/{index}", 0o620)
attrs = termios.tcgetattr(s)
if MODE != "canon":
    attrs[3] &= ~(termios.ICANON | termios.ECHO)     # non-canonical, no echo
attrs[1] |= termios.ONLCR
attrs[6][termios.VMIN] = 1
attrs[6][termios.VINTR] = 7
termios.tcsetattr(s, termios.TCSANOW, attrs)
fcntl.ioctl(m, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
if MODE == "pkt":
    fcntl.ioctl(m, TIOCPKT, struct.pack("i", 1))
IN = b"typed\r\nbytes \x03\x7f and more\n" * 50        # for the slave's reader
OUT = b"printed\nline\n" * 40                          # for the master's reader (ONLCR: \n -> \r\n)
CANON_IN = b"one line\n" + b"\x16\x7fquoted erase\n" + b"\x04" + b"partial \x16\x04 line"   # ^V quotes, ^D ends
os.write(m, IN if MODE != "canon" else CANON_IN)
time.sleep(0.2)          # the echo (canonical mode) is made as the input is processed: before OUT
os.write(s, OUT)
time.sleep(0.2)
truth = {"index": index, "attrs": termios.tcgetattr(s), "pgrp": os.getpgrp()}
if MODE == "canon":
    # the echo (ECHO, ECHOCTL) waits in front of the output: read it now, keep it queued by writing it back
    n = ioc_int(m, termios.FIONREAD)
    first = os.read(m, n)
    truth["echo"] = first[:len(first) - len(OUT.replace(b"\n", b"\r\n"))]
    attrs2 = termios.tcgetattr(s); attrs2[1] &= ~termios.OPOST; termios.tcsetattr(s, termios.TCSANOW, attrs2)
    os.write(s, first)
    termios.tcsetattr(s, termios.TCSANOW, truth["attrs"])
    time.sleep(0.1)

def fionread(fd):
    return ioc_int(fd, termios.FIONREAD)

def drain(fd, n):
    pkt = 1 if MODE == "pkt" and fd == m else 0     # a packet-mode master's reads lead with TIOCPKT_DATA
    out = b""
    while len(out) < n:
        out += os.read(fd, n - len(out) + pkt)[pkt:]
    return out

def verify(*_):
    out = {}
    try:
        out["index"] = ioc_int(m, TIOCGPTN) == index and os.ttyname(s) == f"/dev/pts/{index}"
        out["attrs"] = termios.tcgetattr(s) == truth["attrs"]
        out["winsize"] = struct.unpack("HHHH", fcntl.ioctl(s, termios.TIOCGWINSZ, bytes(8)))[:2] == (33, 111)
        out["packet"] = ioc_int(m, TIOCGPKT) == (MODE == "pkt")
        out["node"] = os.stat(f"/dev/pts/{index}").st_mode & 0o777 == 0o620
        out["ctty"] = os.tcgetpgrp(s) == os.getpgrp() and os.open("/dev/tty", os.O_RDWR) >= 0
        want_out = OUT.replace(b"\n", b"\r\n")
        if MODE == "canon":
            out["queued"] = fionread(s) == len(b"one line\n\x7fquoted erase\n")
            got = drain(m, fionread(m))
            out["out_bytes"] = got == truth["echo"] + want_out or repr((got, truth["echo"]))
            lines = [os.read(s, 100), os.read(s, 100), os.read(s, 100)]
            os.write(m, b"\n")
            lines.append(os.read(s, 100))
            out["in_bytes"] = lines == [b"one line\n", b"\x7fquoted erase\n", b"", b"partial \x04 line\n"] or \
                repr(lines)
            out["after"] = drain(m, fionread(m)) == b"\r\n"       # the echo of the newline
            os.write(s, b"after\n"); os.write(m, b"x\n"); time.sleep(0.1)
            out["after"] = out["after"] and drain(m, 7) == b"after\r\n" and drain(s, 2) == b"x\n"
            raise StopIteration
        out["queued"] = (fionread(m), fionread(s)) == (len(want_out), len(IN))
        out["out_bytes"] = drain(m, len(want_out)) == want_out
        out["in_bytes"] = drain(s, len(IN)) == IN.replace(b"\r", b"\n")     # ICRNL on input
        os.write(s, b"after\n")
        os.write(m, b"x")
        time.sleep(0.1)
        out["after"] = drain(m, 7) == b"after\r\n" and drain(s, 1) == b"x"
    except StopIteration:
        pass
    except Exception as e:
        out["error"] = repr(e)
    with open(os.path.join(DIR, "verdict.tmp"), "w") as f:
        json.dump(out, f)
    os.rename(os.path.join(DIR, "verdict.tmp"), os.path.join(DIR, "verdict.json"))

signal.signal(signal.SIGUSR1, verify)
with open(os.path.join(DIR, "ready.tmp"), "w") as f:
    json.dump({"index": index}, f)
os.rename(os.path.join(DIR, "ready.tmp"), os.path.join(DIR, "ready"))
while True:
    time.sleep(0.05)
'''

ALL_TRUE = {k: True for k in ("index", "attrs", "winsize", "packet", "node", "ctty", "queued", "out_bytes",
                              "in_bytes", "after")}


def start(procs, tmp_path, mode="raw"):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    p = procs.start([python_exe(), str(script), str(tmp_path), mode], cwd=str(tmp_path))
    wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, what="the tty worker")
    assert p.poll() is None, "the worker died during setup"
    return p, json.loads((tmp_path / "ready").read_text())["index"]


def verdict(pid, tmp_path):
    v = tmp_path / "verdict.json"
    if v.exists():
        v.unlink()
    os.kill(pid, signal.SIGUSR1)
    wait_for(v.exists, timeout=30, what="the worker's verdict")
    return json.loads(v.read_text())


@pytest.mark.parametrize("mode", ["raw", "pkt"])
def test_pty_pair_restored_exactly_with_its_queues(procs, tmp_path, mode):
    p, index = start(procs, tmp_path, mode)
    dump_restore(procs, p, str(tmp_path / "img"))
    assert verdict(p.pid, tmp_path) == ALL_TRUE


def test_pty_dump_with_leave_running_puts_every_byte_back(procs, tmp_path):
    p, _ = start(procs, tmp_path)
    res = dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    assert res["left_running"]
    assert verdict(p.pid, tmp_path) == ALL_TRUE


@pytest.mark.parametrize("leave_running", [False, True])
def test_canonical_lines_and_the_line_being_typed_are_restored(procs, tmp_path, leave_running):
    p, index = start(procs, tmp_path, "canon")
    if leave_running:
        dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    else:
        dump_restore(procs, p, str(tmp_path / "img"))
    assert verdict(p.pid, tmp_path) == {k: True for k in ("index", "attrs", "winsize", "packet", "node", "ctty",
                                                          "queued", "out_bytes", "in_bytes", "after")}


def test_pty_index_taken_at_restore_is_refused(procs, tmp_path):
    p, index = start(procs, tmp_path)
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    # someone else gets the index meanwhile
    held = []
    try:
        while True:
            fd = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
            held.append(fd)
            if os.path.exists(f"/dev/pts/{index}"):
                import fcntl, struct
                if struct.unpack("i", fcntl.ioctl(fd, 0x80045430, b"\0" * 4))[0] == index:
                    break
        with pytest.raises((Refusal, Refusals)) as ei:
            restore(str(tmp_path / "img"), Options())
        refusals = getattr(ei.value, "refusals", [ei.value])
        assert {r.reason for r in refusals} == {"tty"}
        assert f"pty index {index} is taken" in refusals[0].detail
        assert not os.path.exists(f"/proc/{p.pid}")
    finally:
        for fd in held:
            os.close(fd)
    # the image is intact: with the index free again, it restores
    out = restore(str(tmp_path / "img"), Options())
    procs.adopt(out["pid"])
    assert verdict(p.pid, tmp_path) == ALL_TRUE


def test_check_names_the_pair(procs, tmp_path):
    p, index = start(procs, tmp_path)
    res = check(p.pid, Options())
    text = json.dumps(res)
    assert f"pty master of pty {index}, controlling terminal" in text
    assert p.poll() is None


OUTSIDE_WORKER = r'''
import json, os, signal, sys, termios, time
DIR = sys.argv[1]
attrs = termios.tcgetattr(0)
attrs[3] &= ~termios.ECHO
attrs[6][termios.VINTR] = 5
termios.tcsetattr(0, termios.TCSANOW, attrs)
truth = termios.tcgetattr(0)

def verify(*_):
    out = {}
    try:
        with open(os.path.join(DIR, "tty-path")) as f:
            want = f.read()
        out["ttyname"] = os.ttyname(0) == want and os.ttyname(1) == want
        out["attrs"] = termios.tcgetattr(0) == truth
        out["same_file"] = os.path.sameopenfile(0, 1) and os.path.sameopenfile(1, 2)
        os.write(1, b"hello from the restored process")
    except StopIteration:
        pass
    except Exception as e:
        out["error"] = repr(e)
    with open(os.path.join(DIR, "verdict.tmp"), "w") as f:
        json.dump(out, f)
    os.rename(os.path.join(DIR, "verdict.tmp"), os.path.join(DIR, "verdict.json"))

signal.signal(signal.SIGUSR1, verify)
open(os.path.join(DIR, "ready"), "w").close()
while True:
    time.sleep(0.05)
'''


def _new_pty():
    import fcntl
    import struct
    m = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
    fcntl.ioctl(m, 0x40045431, struct.pack("i", 0))
    index = struct.unpack("i", fcntl.ioctl(m, 0x80045430, b"\0" * 4))[0]
    return m, f"/dev/pts/{index}"


def test_terminal_outside_needs_shell_job_and_tty(procs, tmp_path):
    import subprocess
    m1, path1 = _new_pty()
    m2, path2 = _new_pty()
    try:
        script = tmp_path / "worker.py"
        script.write_text(OUTSIDE_WORKER)
        s1 = os.open(path1, os.O_RDWR | os.O_NOCTTY)
        p = subprocess.Popen([python_exe(), str(script), str(tmp_path)], stdin=s1, stdout=s1, stderr=s1,
                             close_fds=True, start_new_session=True)
        procs.popens.append(p)
        os.close(s1)
        wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, what="the worker")
        with pytest.raises((Refusal, Refusals)) as ei:
            dump(p.pid, str(tmp_path / "img0"), Options())
        refusals = getattr(ei.value, "refusals", [ei.value])
        assert [(r.reason, r.fd) for r in refusals] == [("tty-outside", 0), ("tty-outside", 1), ("tty-outside", 2)]
        assert "--shell-job" in refusals[0].detail
        assert p.poll() is None and not os.path.exists(tmp_path / "img0")
        dump(p.pid, str(tmp_path / "img"), Options(shell_job=True))
        p.wait()
        with pytest.raises(Refusal) as ei:
            restore(str(tmp_path / "img"), Options())
        assert ei.value.reason == "tty-outside" and "--tty" in ei.value.detail
        with pytest.raises(Refusal) as ei:
            restore(str(tmp_path / "img"), Options(tty=str(tmp_path / "worker.py")))
        assert ei.value.reason == "tty-outside" and "not a terminal" in ei.value.detail
        assert not os.path.exists(f"/proc/{p.pid}")
        (tmp_path / "tty-path").write_text(path2)
        out = restore(str(tmp_path / "img"), Options(tty=path2))
        procs.adopt(out["pid"])
        assert verdict(p.pid, tmp_path) == {"ttyname": True, "attrs": True, "same_file": True}
        got = b""
        while not got.endswith(b"process"):
            got += os.read(m2, 100)
        assert got == b"hello from the restored process"
    finally:
        os.close(m1)
        os.close(m2)
