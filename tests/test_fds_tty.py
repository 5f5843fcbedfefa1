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

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import procs, python_exe, wait_for  # noqa: F401
from fds_support import ask_verdict, dump_restore, start_worker

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
os.dup2(os.open("/dev/tty", os.O_RDWR | os.O_NONBLOCK), 603)      # its controlling terminal by that name
DEVTTY_FL = fcntl.fcntl(603, fcntl.F_GETFL)
os.chmod(f"/dev/pts/{index}", 0o620)
attrs = termios.tcgetattr(s)
if MODE not in ("canon", "noeof"):
    attrs[3] &= ~(termios.ICANON | termios.ECHO)     # non-canonical, no echo
if MODE == "noeof":
    attrs[6][termios.VEOF] = 0                       # _POSIX_VDISABLE
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
        out["devtty"] = (os.readlink("/proc/self/fd/603"), os.major(os.fstat(603).st_rdev),
                         fcntl.fcntl(603, fcntl.F_GETFL), os.tcgetpgrp(603)) == \
            ("/dev/tty", 5, DEVTTY_FL, os.getpgrp()) and DEVTTY_FL & os.O_NONBLOCK != 0
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
            # the echo of the newline: it reaches the master side asynchronously (a read
            # of FIONREAD bytes at once saw none now and then), so read exactly its 2 bytes
            out["after"] = drain(m, 2) == b"\r\n"
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

ALL_TRUE = {k: True for k in ("index", "attrs", "winsize", "packet", "node", "ctty", "devtty", "queued",
                              "out_bytes", "in_bytes", "after")}


def start(procs, tmp_path, mode="raw"):
    p, ready = start_worker(procs, tmp_path, [str(tmp_path), mode], WORKER, "the tty worker")
    return p, ready["index"]


verdict = ask_verdict


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
                                                          "devtty", "queued", "out_bytes", "in_bytes", "after")}


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
try:
    os.dup2(os.open("/dev/tty", os.O_RDWR), 7)     # the controlling terminal by its other name (if any)
    devtty = True
except OSError:
    devtty = False

def verify(*_):
    out = {}
    try:
        if devtty:
            # the same terminal as fd 0: a termios change there shows here
            a = termios.tcgetattr(0); a[6][termios.VINTR] = 9; termios.tcsetattr(0, termios.TCSANOW, a)
            out["devtty"] = os.readlink("/proc/self/fd/7") == "/dev/tty" and \
                termios.tcgetattr(7)[6][termios.VINTR] in (9, b"\x09")
            termios.tcsetattr(0, termios.TCSANOW, truth)
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


SHELL1 = r'''
import os, sys, time
# a shell on pty 1: session leader, pty 1 its controlling terminal; its job: the worker
path, worker, out = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(path, os.O_RDWR)                    # no O_NOCTTY: our controlling terminal
for n in (0, 1, 2):
    os.dup2(fd, n)
os.closerange(3, 1024)
go_r, go_w = os.pipe()
child = os.fork()
if child == 0:
    os.close(go_w)
    os.read(go_r, 1)                             # once it is the foreground job (tcsetattr needs it)
    os.close(go_r)
    os.execv(sys.executable, [sys.executable, worker, out])
os.setpgid(child, child)                         # a job: its own group, the shell's session
os.tcsetpgrp(0, child)                           # in the foreground, as a shell runs it
os.write(go_w, b"x")
with open(os.path.join(out, "job-pid.tmp"), "w") as f:
    f.write(str(child))
os.rename(os.path.join(out, "job-pid.tmp"), os.path.join(out, "job-pid"))      # whole when seen
os.waitpid(child, 0)                             # reaps it once dumped
time.sleep(600)
'''

SHELL2 = r'''
import os, subprocess, sys, time
# another shell, on pty 2, that runs `ckpt restore --tty inherit` and stays
path, repo, img, out = sys.argv[1:5]
fd = os.open(path, os.O_RDWR)
for n in (0, 1, 2):
    os.dup2(fd, n)
os.closerange(3, 1024)
r = subprocess.run([sys.executable, "-m", "engine", "restore", "-D", img, "--tty", "inherit"], cwd=repo,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
with open(os.path.join(out, "restore-rc.tmp"), "w") as f:
    f.write(f"{r.returncode} {r.stdout.decode(errors='replace')}")
os.rename(os.path.join(out, "restore-rc.tmp"), os.path.join(out, "restore-rc"))      # whole when seen
time.sleep(600)
'''


def test_shell_job_moves_to_the_restoring_shells_session_and_terminal(procs, tmp_path):
    """criu --shell-job: a job of one shell (its own group in the shell's
    session, the shell's terminal its controlling one) is dumped from
    elsewhere with --shell-job and restored by another shell with --tty
    inherit: it joins that shell's session and terminal, with its termios."""
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    m1, path1 = _new_pty()
    m2, path2 = _new_pty()
    shells = []
    try:
        (tmp_path / "worker.py").write_text(OUTSIDE_WORKER)
        (tmp_path / "shell1.py").write_text(SHELL1)
        (tmp_path / "shell2.py").write_text(SHELL2)
        s1 = subprocess.Popen([python_exe(), str(tmp_path / "shell1.py"), path1, str(tmp_path / "worker.py"),
                               str(tmp_path)], close_fds=True, start_new_session=True)
        shells.append(s1)
        wait_for(lambda: (tmp_path / "ready").exists(), what="the job")
        job = int((tmp_path / "job-pid").read_text())
        assert os.getsid(job) == s1.pid and os.getpgid(job) == job
        with pytest.raises((Refusal, Refusals)) as ei:
            dump(job, str(tmp_path / "img0"), Options())
        reasons = {r.reason for r in getattr(ei.value, "refusals", [ei.value])}
        assert reasons == {"tty-outside", "unsupported-state"}, reasons     # its terminal; its session
        dump(job, str(tmp_path / "img"), Options(shell_job=True))
        wait_for(lambda: not os.path.exists(f"/proc/{job}"), what="the dumped job to be reaped")
        s2 = subprocess.Popen([python_exe(), str(tmp_path / "shell2.py"), path2, repo, str(tmp_path / "img"),
                               str(tmp_path)], close_fds=True, start_new_session=True)
        shells.append(s2)
        # a foreground job: ckpt restore stays its parent until it exits
        wait_for(lambda: _in_session(job, s2.pid), timeout=60, what="the restore")
        procs.adopt(job)
        (tmp_path / "tty-path").write_text(path2)
        assert verdict(job, tmp_path) == {"ttyname": True, "attrs": True, "same_file": True, "devtty": True}
        with open(f"/proc/{job}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        dev = os.stat(path2).st_rdev
        assert (int(rest[3]), int(rest[2])) == (s2.pid, job)          # session: the restoring shell's; own group
        assert int(rest[4]) == (os.major(dev) << 8) | os.minor(dev)   # controlling terminal: pty 2
        assert int(rest[5]) == job                                     # the foreground job there, as it was
        # ckpt restore stays the job's parent and has not returned (README);
        # the restorer, its parent until then, reports and exits
        wait_for(lambda: _parent(_parent(job)) == s2.pid or (tmp_path / "restore-rc").exists(), timeout=10,
                 what="ckpt restore to be the job's parent")
        assert _parent(_parent(job)) == s2.pid and not (tmp_path / "restore-rc").exists()
        os.kill(job, 9)
        wait_for(lambda: (tmp_path / "restore-rc").exists(), timeout=30, what="ckpt restore to return")
        # ckpt's exit status is the job's, as a shell gives it: killed by SIGKILL
        assert (tmp_path / "restore-rc").read_text().startswith(f"{128 + 9} ckpt: restored pid")
    finally:
        for s in shells:
            s.kill()
            s.wait()
        os.close(m1)
        os.close(m2)


JOB_SHELL = SHELL1.replace(
    'path, worker, out = sys.argv[1], sys.argv[2], sys.argv[3]', 'path, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]'
).replace('os.execv(sys.executable, [sys.executable, worker, out])', 'os.execv(argv[0], argv)')

JOBCTL_SHELL = r'''
import os, signal, sys, time
# a job-control shell on pty 2: `ckpt restore --tty inherit` is its job (its
# own group, in the foreground); when the job stops the shell takes the
# terminal back and notes it, and runs `fg` once the file "fg" appears
path, repo, img, out = sys.argv[1:5]
fd = os.open(path, os.O_RDWR)
for n in (0, 1, 2):
    os.dup2(fd, n)
os.closerange(3, 1024)
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.setpgid(0, 0)
    os.tcsetpgrp(0, os.getpid())
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    os.dup2(w, 1)
    os.dup2(w, 2)
    os.chdir(repo)
    os.execv(sys.executable, [sys.executable, "-m", "engine", "restore", "-D", img, "--tty", "inherit"])
os.close(w)
try:
    os.setpgid(child, child)                     # (both sides, as a shell does)
except PermissionError:
    pass                                         # it did, and ran ckpt already
os.tcsetpgrp(0, child)
with open(os.path.join(out, "ckpt-pid.tmp"), "w") as f:
    f.write(str(child))
os.rename(os.path.join(out, "ckpt-pid.tmp"), os.path.join(out, "ckpt-pid"))
stops = 0
while True:
    _, st = os.waitpid(child, os.WUNTRACED)
    if not os.WIFSTOPPED(st):
        break
    os.tcsetpgrp(0, os.getpgrp())
    stops += 1
    open(os.path.join(out, f"stopped-{stops}"), "w").close()
    while not os.path.exists(os.path.join(out, "fg")):
        time.sleep(0.05)
    os.unlink(os.path.join(out, "fg"))
    os.tcsetpgrp(0, child)
    os.killpg(child, signal.SIGCONT)
said = os.read(r, 65536).decode(errors="replace")
with open(os.path.join(out, "restore-rc.tmp"), "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(st)} {said}")
os.rename(os.path.join(out, "restore-rc.tmp"), os.path.join(out, "restore-rc"))
time.sleep(600)
'''


def test_shell_pipeline_in_the_foreground_is_waited_for_as_a_whole_and_follows_job_control(procs, tmp_path):
    """A job that is a tree (`sh -c 'cat | sort'`: one group of three),
    dumped with --shell-job from one shell and restored by a job-control
    shell on another terminal with --tty inherit: ckpt restore stands for
    the job there, as `fg` would. It returns only once the whole group is
    gone (sort prints what cat read, after ^D); ^Z stops the job and ckpt
    with it (the shell gets the terminal back and sees a stopped job), and
    the shell's fg gives the terminal back to the job and continues it."""
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    m1, path1 = _new_pty()
    m2, path2 = _new_pty()
    shells = []
    try:
        (tmp_path / "shell1.py").write_text(JOB_SHELL)
        (tmp_path / "shell2.py").write_text(JOBCTL_SHELL)
        s1 = subprocess.Popen([python_exe(), str(tmp_path / "shell1.py"), path1, str(tmp_path), "/bin/sh", "-c",
                               "cat | sort"], close_fds=True, start_new_session=True)
        shells.append(s1)
        wait_for(lambda: (tmp_path / "job-pid").exists(), what="the job")
        job = int((tmp_path / "job-pid").read_text())

        def kids():
            with open(f"/proc/{job}/task/{job}/children") as f:
                return [int(k) for k in f.read().split()]
        wait_for(lambda: sorted(_comm(k) for k in kids()) == ["cat", "sort"]
                 and all(_stat(k)[0] == "S" for k in kids()), what="cat | sort")
        members = [job] + kids()
        dump(job, str(tmp_path / "img"), Options(shell_job=True))
        for p in members:       # sh: shell1 reaps it; cat and sort may come to this test (a subreaper) to reap
            procs.reap(p, timeout=10)
        wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in members), what="the dumped job to go")
        s2 = subprocess.Popen([python_exe(), str(tmp_path / "shell2.py"), path2, repo, str(tmp_path / "img"),
                               str(tmp_path)], close_fds=True, start_new_session=True)
        shells.append(s2)
        wait_for(lambda: all(_in_session(p, s2.pid) for p in members) or (tmp_path / "restore-rc").exists(),
                 timeout=60, what="the restore")
        for p in members:
            procs.adopt(p)
        ckpt = int((tmp_path / "ckpt-pid").read_text())
        assert {_stat(p)[2] for p in members} == {job}                 # one group, the terminal's foreground
        wait_for(lambda: _stat(s2.pid)[5] == job, what="the job in the foreground")
        os.write(m2, b"pear\napple\n")
        assert b"apple" in _read_until(m2, b"apple\r\n", 10)
        s2fd = os.open(path2, os.O_RDWR | os.O_NOCTTY)
        try:
            # read by cat (a ^Z flushes what the terminal still holds: isig)
            wait_for(lambda: _inq(s2fd) == 0, what="cat to read the lines")
        finally:
            os.close(s2fd)
        # ckpt restore, the job's parent, waits for it
        # (the restorer, the members' parent until then, reports and exits)
        wait_for(lambda: _parent(job) == ckpt or (tmp_path / "restore-rc").exists(), timeout=10,
                 what="ckpt restore to be the job's parent")
        assert _parent(job) == ckpt and not (tmp_path / "restore-rc").exists()
        os.write(m2, b"\x1a")                                       # ^Z: the job stops, and ckpt with it
        wait_for(lambda: (tmp_path / "stopped-1").exists() or (tmp_path / "restore-rc").exists(), timeout=20,
                 what="ckpt restore to stop")
        assert (tmp_path / "stopped-1").exists(), (tmp_path / "restore-rc").read_text()
        assert all(_stat(p)[0] == "T" for p in members)
        assert _stat(s2.pid)[5] == s2.pid                              # the shell has its terminal back
        (tmp_path / "fg").touch()                                      # fg: the job continues, in the foreground
        wait_for(lambda: all(_stat(p)[0] == "S" for p in members) and _stat(s2.pid)[5] == job, timeout=20,
                 what="the job to continue in the foreground")
        assert _stat(ckpt)[0] != "T" and not (tmp_path / "restore-rc").exists()
        os.write(m2, b"\x04")                                       # ^D: cat ends, sort prints, sh exits
        wait_for(lambda: (tmp_path / "restore-rc").exists(), timeout=20, what="the job to end")
        shown = _read_until(m2, b"pear\r\n", 2)
        assert b"apple\r\npear\r\n" in shown, shown
        assert (tmp_path / "restore-rc").read_text().startswith(f"0 ckpt: restored pid {job}")
        assert not any(_live(p) for p in members)                     # the whole job is gone
        assert _stat(s2.pid)[5] == ckpt                                # the terminal: ckpt's group took it back
    finally:
        for s in shells:
            s.kill()
            s.wait()
        os.close(m1)
        os.close(m2)


def _live(pid: int) -> bool:
    try:
        return _stat(pid)[0] not in "ZX"
    except OSError:
        return False


def _inq(fd: int) -> int:
    import fcntl
    import struct
    import termios
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def _stat(pid: int) -> list:
    """/proc/PID/stat after the command: [state, ppid, pgrp, session, tty_nr, tpgid]."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return [rest[0]] + [int(x) for x in rest[1:6]]


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _in_session(pid: int, sid: int) -> bool:
    try:
        return os.getsid(pid) == sid
    except OSError:
        return False


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _read_until(fd: int, want: bytes, seconds: float) -> bytes:
    import select
    import time
    end = time.monotonic() + seconds
    got = b""
    while want not in got and time.monotonic() < end:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                got += os.read(fd, 65536)
            except OSError:
                break
    return got


def test_less_on_one_terminal_is_restored_onto_another_and_obeys_its_keys(procs, tmp_path):
    """A real program through a pty: less(1), a job of a shell on pty 1,
    dumped with --shell-job, restored by a shell on pty 2 (--tty inherit)
    that puts it in the foreground: keys typed on pty 2 drive it (G: the
    end of the file, q: quit)."""
    import fcntl
    import shutil
    import subprocess
    import time
    less = shutil.which("less")
    if not less:
        pytest.skip("less is not installed")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "text").write_text("".join(f"line {i} of the text\n" for i in range(1, 201)))
    m1, path1 = _new_pty()
    m2, path2 = _new_pty()
    for m in (m1, m2):
        fcntl.ioctl(m, 0x5414, struct_pack_winsize(24, 80))
    shells = []
    try:
        (tmp_path / "shell1.py").write_text(JOB_SHELL)
        (tmp_path / "shell2.py").write_text(SHELL2)
        env = dict(os.environ, TERM="vt100", LESS="", LESSHISTFILE="-")
        s1 = subprocess.Popen([python_exe(), str(tmp_path / "shell1.py"), path1, str(tmp_path), less,
                               str(tmp_path / "text")], close_fds=True, start_new_session=True, env=env)
        shells.append(s1)
        assert b"line 1 of the text" in _read_until(m1, b"line 23 of the text", 20), "less did not draw"
        job = int((tmp_path / "job-pid").read_text())
        time.sleep(0.3)                                    # less waits for a key
        dump(job, str(tmp_path / "img"), Options(shell_job=True))
        wait_for(lambda: not os.path.exists(f"/proc/{job}"), what="the dumped job to be reaped")
        s2 = subprocess.Popen([python_exe(), str(tmp_path / "shell2.py"), path2, repo, str(tmp_path / "img"),
                               str(tmp_path)], close_fds=True, start_new_session=True)
        shells.append(s2)
        wait_for(lambda: _in_session(job, s2.pid) or (tmp_path / "restore-rc").exists(), timeout=60,
                 what="the restore")
        procs.adopt(job)
        time.sleep(0.5)
        os.write(m2, b"G")
        out = _read_until(m2, b"line 200 of the text", 20)
        assert b"line 200 of the text" in out, out[-500:]
        os.write(m2, b"q")
        # less quits; ckpt restore, its parent and foreground job meanwhile, returns
        wait_for(lambda: (tmp_path / "restore-rc").exists(), timeout=20, what="less to quit")
        assert (tmp_path / "restore-rc").read_text().startswith(f"0 ckpt: restored pid {job}")
    finally:
        for s in shells:
            s.kill()
            s.wait()
        os.close(m1)
        os.close(m2)


def struct_pack_winsize(rows: int, cols: int) -> bytes:
    import struct
    return struct.pack("HHHH", rows, cols, 0, 0)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_canonical_mode_without_veof_is_refused_and_unharmed(procs, tmp_path):
    """The line being typed is made readable with VEOF; with VEOF disabled
    it cannot be seen: refused (`tty-queued`), nothing moved."""
    import fcntl
    import struct
    p, index = start(procs, tmp_path, "noeof")
    before = {}
    for fd in (600, 601):
        with open(f"/proc/{p.pid}/fdinfo/{fd}") as f:
            before[fd] = f.read()
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    refusals = getattr(ei.value, "refusals", [ei.value])
    assert {(r.reason, r.fd) for r in refusals} == {("tty-queued", 600), ("tty-queued", 601), ("tty-queued", 602)}
    assert "VEOF disabled" in refusals[0].detail
    assert p.poll() is None and not os.path.exists(tmp_path / "img")
    from engine.pidfd import target_fd
    with target_fd(p.pid, 601) as s:
        queued = struct.unpack("i", fcntl.ioctl(s, 0x541B, b"\0" * 4))[0]
    assert queued > 0                 # its lines still wait for the reader: nothing was taken


def test_master_with_its_own_line_discipline_is_refused(procs, tmp_path):
    """The master has a line discipline of its own (TIOCSETD on the master
    fd; its termios ioctls act on the slave): anything but N_TTY there is
    refused by name, the slave's N_TTY notwithstanding."""
    src = ("import fcntl, os, struct, sys, time\n"
           "m, s = os.openpty()\n"
           "fcntl.ioctl(m, 0x5423, struct.pack('i', 27))\n"       # TIOCSETD N_NULL on the master only
           "os.dup2(m, 600); os.dup2(s, 601)\n"
           "open(sys.argv[1], 'w').close()\n"
           "while True:\n    time.sleep(1)\n")
    (tmp_path / "w.py").write_text(src)
    p = procs.start([python_exe(), str(tmp_path / "w.py"), str(tmp_path / "ready")])
    wait_for(lambda: (tmp_path / "ready").exists(), what="the worker")
    out = check(p.pid, Options())
    tty = [r for r in out["refusals"] if r["reason"] == "tty"]
    assert tty and all("master's line discipline is 27" in r["detail"] for r in tty), out["refusals"]


def test_foreground_wait_gives_the_signal_of_a_job_that_died_between_its_reads():
    """The job killed right after ckpt's last reap and before it read /proc
    is a zombie there, left out of the group: its status must still be
    reaped and given (ckpt restore --tty returned 0 for a SIGKILLed job,
    1 CI run in ~5 under load). The race is made certain by skipping the
    first reap."""
    from engine_core_support import in_child

    def run():
        from engine.fds import tty
        job = os.fork()
        if job == 0:
            os.setpgid(0, 0)
            os.kill(os.getpid(), 9)
        wait_for(lambda: open(f"/proc/{job}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", what="the zombie")
        real, calls = tty._reap_children, []

        def late(status):
            calls.append(1)
            if len(calls) > 1:
                real(status)
        tty._reap_children = late
        return tty.wait_foreground(job, "/nonexistent/tty", root=job)
    assert in_child(run) == "137"
