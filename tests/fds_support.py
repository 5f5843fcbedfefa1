"""Test support for the fd-kind handlers: real target processes, FdInfo
built from /proc the way the core does, and a miniature of the core's fd
dump/restore loop (classify -> dump -> image commit -> validate -> restore
-> dup3 to the same fd number -> finish) run in the test process itself.

Restored fds are installed in THIS process at the dumped fd numbers, so the
targets put their fds at high numbers (>= 500) that pytest never uses.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional

from engine.context import DumpContext, Options, RestoreContext
from engine.fds import FdInfo, handler_for, _dups
from engine.image import ImageReader, ImageWriter

HIGH = 500

_TARGET = r'''
import json, os, signal, sys, time, ctypes, fcntl, select, struct
libc = ctypes.CDLL(None, use_errno=True)
READY, REPORT = sys.argv[1], sys.argv[2]
report = {}
def _check(*_):
    try:
        exec(compile(CHECK, "check", "exec"), globals())
    except BaseException as e:
        report["error"] = repr(e)
    with open(REPORT + ".tmp", "w") as f:
        json.dump(report, f)
    os.rename(REPORT + ".tmp", REPORT)
CHECK = %r
exec(compile(%r, "setup", "exec"), globals())
signal.signal(signal.SIGUSR1, _check)
with open(READY + ".tmp", "w") as f:      # rename: "ready" appears only once it is closed
    f.write("ready")
os.rename(READY + ".tmp", READY)
while True:
    signal.pause()
'''


class Target:
    """A real process running `setup` (Python source), then waiting; on
    ``check()`` (SIGUSR1) it runs `check` and returns its ``report`` dict.
    Killed and reaped on exit, also on failure."""

    def __init__(self, tmp_path, setup: str, check: str = "", pass_fds: Iterable[int] = ()):
        self.dir = str(tmp_path)
        self.ready = os.path.join(self.dir, f"ready-{id(self)}")
        self.report = os.path.join(self.dir, f"report-{id(self)}")
        src = _TARGET % (check, setup)
        self.proc = subprocess.Popen([sys.executable, "-c", src, self.ready, self.report],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, close_fds=True, pass_fds=tuple(pass_fds))
        self.pid = self.proc.pid

    def __enter__(self) -> "Target":
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(self.ready):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"target died: {self.proc.stderr.read().decode()}")
                if time.monotonic() > deadline:
                    raise RuntimeError("target never became ready")
                time.sleep(0.01)
        except BaseException:
            self.close()
            raise
        return self

    def check(self, timeout: float = 10) -> dict:
        if os.path.exists(self.report):
            os.unlink(self.report)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.report):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("target did not report")
            time.sleep(0.01)
        with open(self.report) as f:
            return json.load(f)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()

    def __exit__(self, *exc) -> None:
        self.close()
        if exc[0] is None:
            # The target is gone: each image dumped from it, unless the test
            # restored it itself, must restore on this unchanged machine.
            for img in _DUMPED.pop(self.pid, []):
                if img not in _RESTORED:
                    from restorable import rehearse_fds
                    rehearse_fds(img, self.pid)
        _DUMPED.pop(self.pid, None)


def fd_info(pid: int, fd: int) -> FdInfo:
    """What the core gathers for one fd of a (frozen) process."""
    link = os.readlink(f"/proc/{pid}/fd/{fd}")
    st = os.stat(f"/proc/{pid}/fd/{fd}")
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        text = f.read()
    kv: Dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            kv.setdefault(k.strip(), v.strip())
    return FdInfo(pid=pid, fd=fd, link=link, mode=st.st_mode, dev=st.st_dev, ino=st.st_ino,
                  nlink=st.st_nlink, size=st.st_size, rdev=st.st_rdev, pos=int(kv["pos"]),
                  flags=int(kv["flags"], 8), mnt_id=int(kv["mnt_id"]), fdinfo=kv,
                  fdinfo_text=text, stat=st)


def all_fds(pid: int) -> Dict[int, FdInfo]:
    return {int(n): fd_info(pid, int(n)) for n in os.listdir(f"/proc/{pid}/fd")}


def dump_ctx(pid: int, image=None) -> DumpContext:
    return DumpContext(pid=pid, options=Options(), image=image, all_fds=all_fds(pid))


def classify(pid: int, fd: int) -> str:
    """classify() of one fd, as ``ckpt check`` would."""
    ctx = dump_ctx(pid)
    kind, mod = handler_for(ctx.all_fds[fd])
    return mod.classify(ctx.all_fds[fd], ctx)


_DUMPED: Dict[int, List[str]] = {}     # target pid -> images dump() made of it
_RESTORED: set = set()                  # images restore() was called on


def dump(pid: int, fds: List[int], image_dir: str) -> str:
    """Dump the given fds of `pid` into a committed image; dup'ed fds become
    {"dup_of": leader} records, as the core is asked to do."""
    with ImageWriter(image_dir) as img:
        ctx = dump_ctx(pid, img)
        lead = _dups.leaders(ctx)
        infos = [ctx.all_fds[fd] for fd in sorted(fds)]
        missing = {lead[i.fd] for i in infos} - set(fds)
        assert not missing, f"dump the leaders too (the core dumps every fd): {missing}"
        mods = {}
        for info in infos:                      # pre-flight first
            if lead[info.fd] == info.fd:
                mods[info.fd] = handler_for(info)
                mods[info.fd][1].classify(info, ctx)
        records = []
        for info in infos:
            common = {"fd": info.fd, "flags": info.flags, "pos": info.pos,
                      "cloexec": info.cloexec, "link": info.link}
            if lead[info.fd] != info.fd:
                rec = {"dup_of": lead[info.fd]}
                common["kind"] = records[[r["fd"] for r in records].index(lead[info.fd])]["kind"]
            else:
                kind, mod = mods[info.fd]
                rec = mod.dump(info, ctx)
                common["kind"] = kind
            rec.update(common)
            records.append(rec)
        img.write_json("fds.json", records)
        final = img.commit()
    _DUMPED.setdefault(pid, []).append(final)
    return final


class LocalTask:
    """The restored "new process" is this test process: syscalls run here."""

    def __init__(self):
        self._buf = ctypes.create_string_buffer(4096)
        self.scratch = ctypes.addressof(self._buf)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long

    def syscall(self, nr: int, *args) -> int:
        ret = self._libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
        return -ctypes.get_errno() if ret == -1 else ret

    def write_mem(self, addr: int, data: bytes) -> None:
        ctypes.memmove(addr, data, len(data))

    def read_mem(self, addr: int, n: int) -> bytes:
        return ctypes.string_at(addr, n)


class Restored:
    """fds restored into this process at their dumped numbers; closes them."""

    def __init__(self, fds: List[int]):
        self.fds = fds

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


def restore(image_dir: str, pid: Optional[int] = None, same_node: bool = True,
            options: Optional[Options] = None) -> Restored:
    """validate every record, then restore each into this process at its
    fd number (dup3 like the core), followers dup'ed, then finish()."""
    _RESTORED.add(os.path.abspath(image_dir))
    img = ImageReader(image_dir)
    img.verify()
    records = img.read_json("fds.json")
    # What a real restore checks of these records before any process exists.
    from engine import imagecheck, restore as core_restore
    core_restore.check_fd_records(records)
    imagecheck.check_fd_records(img, records)
    ctx = RestoreContext(options=options or Options(), image=img, same_node=same_node, records=records,
                         pid=pid)
    from engine.fds import handler
    try:
        for rec in records:
            assert rec["fd"] >= HIGH, "tests must use high fd numbers"
            if rec.get("dup_of") is None:
                handler(rec["kind"]).validate(rec, ctx)
    except BaseException:
        img.close()
        raise
    installed: List[int] = []
    done = Restored(installed)
    try:
        for rec in records:
            if rec.get("dup_of") is not None:
                src = rec["dup_of"]
            else:
                src = handler(rec["kind"]).restore(rec, ctx)
            os.dup2(src, rec["fd"], inheritable=not rec["cloexec"])
            installed.append(rec["fd"])
            if rec.get("dup_of") is None:
                os.close(src)
        task = LocalTask()
        for rec in records:
            fin = getattr(handler(rec["kind"]), "finish", None)
            if rec.get("dup_of") is None and fin is not None:
                fin(rec, ctx, task)
        from engine import files
        files.close_shared(ctx)             # the ghosts' own fds: each fd has its reopen
    except BaseException:
        done.__exit__()
        raise
    finally:
        img.close()                         # the image directory's fd (engine/image.py)
    return done


def assert_hostile_records_invalid(image_dir: str, edits) -> None:
    """The image's first fd record validates; each record edits(good)
    returns (a list) is refused as image-invalid by its handler."""
    from engine.fds import handler
    reader = ImageReader(image_dir)
    try:
        recs = reader.read_json("fds.json")
        ctx = RestoreContext(options=Options(), image=reader, same_node=True, records=recs, pid=None)
        good = recs[0]
        handler(good["kind"]).validate(good, ctx)
        from engine.errors import Refusal
        for rec in edits(good):
            try:
                handler(good["kind"]).validate(rec, ctx)
            except Refusal as e:
                assert e.reason == "image-invalid", (rec, e)
            else:
                raise AssertionError(f"not refused: {rec}")
    finally:
        reader.close()


def assert_flow_label_lease_refused(tmp_path, make_socket: str) -> None:
    """A target whose IPv6 socket (`make_socket`, Python that binds r)
    takes a flow label lease (IPV6_FLOWLABEL_MGR): refused (`socket`,
    naming the label) while the namespace lists it, not dropped
    (engine/fds/_flowlabel.py: a lease cannot be tied to its socket)."""
    import pytest
    from engine.errors import Refusal
    setup = f"""
import random, socket, struct
label = random.randrange(1, 1 << 20)     # a label released lingers a while (EPERM to take it again)
r = {make_socket}
# struct in6_flowlabel_req: dst, label, action GET, share PROCESS (owned by
# this pid: tests running beside this one, other pids, are not refused by
# it), flags CREATE
r.setsockopt(41, 32, socket.inet_pton(socket.AF_INET6, "::1") + struct.pack("!I", label)
             + struct.pack("=BBHHHI", 0, 2, 1, 0, 0, 0))
os.dup2(r.fileno(), 500); r.close()
"""
    with Target(tmp_path, setup, "report['label'] = label") as t:
        label = t.check()["label"]
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket" and "flow label" in ei.value.detail and f"{label:05X}" in ei.value.detail


def kill_and_reap(p) -> None:
    """SIGKILL a Popen the test started and reap it; gone already is fine."""
    try:
        os.kill(p.pid, 9)
    except OSError:
        pass
    try:
        p.wait(timeout=5)
    except Exception:
        pass


def read_available(fd: int, chunk: int = 1 << 16) -> bytes:
    """Every byte readable on `fd` now: read in `chunk`-sized reads until
    EOF or, on a non-blocking fd, EAGAIN."""
    out = []
    while True:
        try:
            b = os.read(fd, chunk)
        except BlockingIOError:
            break
        if not b:
            break
        out.append(b)
    return b"".join(out)


def dump_restore(procs, p, image_dir: str) -> None:
    """Dump the running workload `p` (a Popen started through the `procs`
    fixture) into `image_dir`, reap it, restore it from there at the same
    pid and hand the restored process to `procs` to kill and reap."""
    # Late imports: the fd unit tests that use this module need neither.
    from engine.context import Options
    from engine.dump import dump
    from engine.restore import restore
    res = dump(p.pid, image_dir, Options())
    assert not res["left_running"]
    p.wait()
    _members_gone(image_dir)
    out = restore(image_dir, Options())
    assert out["pid"] == p.pid
    procs.adopt(p.pid)


# -- worker scripts that judge themselves ------------------------------------------
# A worker sets up its fds, writes `ready` (JSON: what the test needs to
# know) and, on SIGUSR1, writes its own verdict to `verdict.json`.

def start_worker(procs, tmp_path, argv: List[str], src: Optional[str] = None, what: str = "the worker",
                 ready_json: bool = True):
    """Start a worker (`src` written to worker.py and run with `argv`, or
    `argv` as it is) in `tmp_path`; wait until it is ready and return
    (the Popen, what it wrote to `ready`: parsed as JSON if `ready_json`)."""
    from engine_core_support import python_exe, wait_for
    if src is not None:
        (tmp_path / "worker.py").write_text(src)
        argv = [python_exe(), str(tmp_path / "worker.py")] + list(argv)
    p = procs.start(list(argv), cwd=str(tmp_path))
    ready = tmp_path / "ready"
    wait_for(lambda: ready.exists() or p.poll() is not None, what=what)
    assert p.poll() is None, f"{what} exited with {p.returncode} during setup"
    text = ready.read_text()
    return p, (json.loads(text) if ready_json and text else text)


def ask_verdict(pid: int, tmp_path, timeout: float = 30) -> dict:
    """SIGUSR1 the worker and return the verdict it writes."""
    from engine_core_support import wait_for
    v = tmp_path / "verdict.json"
    if v.exists():
        v.unlink()
    os.kill(pid, signal.SIGUSR1)
    wait_for(v.exists, timeout=timeout, what=f"the verdict of pid {pid}")
    return json.loads(v.read_text())


class NotOurChild:
    """A target dump_restore can dump though this test did not start it (a
    worker's child, a process restored earlier): its `wait` waits until
    the dump's kill left it a zombie or gone, for its parent to reap."""

    def __init__(self, pid: int):
        self.pid = pid

    def wait(self) -> None:
        from engine_core_support import wait_for
        wait_for(self._dead, what=f"pid {self.pid} killed by the dump")

    def _dead(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True


def _members_gone(image_dir: str, timeout: float = 10.0) -> None:
    """A tree's other members, killed by the dump, are orphans of this
    subreaper: reap them, so their PIDs are free for the restore (a zombie
    member made it pid-in-use)."""
    path = os.path.join(image_dir, "tree.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        pids = [m["pid"] for m in json.load(f)["members"]]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if not any(os.path.exists(f"/proc/{pid}") for pid in pids):
            return
        time.sleep(0.01)
    raise AssertionError(f"tree members still there after the dump: {[p for p in pids if os.path.exists(f'/proc/{p}')]}")


# -- ping(8), for the ping-socket and raw-socket tests ---------------------------

import contextlib  # noqa: E402


@contextlib.contextmanager
def real_ping(tmp_path, args: List[str]):
    """ping -n -i 0.3 ARGS running with three replies counted: yields
    (Popen, seqs()), seqs() being the icmp_seq numbers printed so far;
    killed and reaped after."""
    import re
    out = tmp_path / "ping.out"
    with open(out, "w") as f:
        p = subprocess.Popen(["ping", "-n", "-i", "0.3"] + args, stdin=subprocess.DEVNULL, stdout=f,
                             stderr=subprocess.STDOUT, close_fds=True, start_new_session=True)
    try:
        def seqs() -> List[int]:
            return [int(m) for m in re.findall(r"icmp_seq=(\d+)", out.read_text())]
        deadline = time.monotonic() + 10
        while len(seqs()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        yield p, seqs
    finally:
        kill_and_reap(p)


def dump_between_packets(pid: int, image_dir: str, queued: str, attempts: int) -> None:
    """A full dump of a process whose socket may hold a packet at the
    freeze (refused, the detail naming `queued`): again until one freeze
    meets none."""
    from engine.dump import dump as full_dump
    from engine.errors import Refusal, Refusals
    for _ in range(attempts):
        try:
            full_dump(pid, image_dir, Options())
            return
        except (Refusal, Refusals) as e:
            assert queued in str(e), e
            time.sleep(0.1)
    raise AssertionError(f"every freeze met {queued}")


def ping_counts_on(seqs, n: int) -> None:
    """The restored ping's sequence numbers go on from n, every request
    answered (no number missing or repeated)."""
    deadline = time.monotonic() + 10
    while max(seqs()) < n + 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    got = seqs()
    assert max(got) >= n + 4 and got == list(range(1, len(got) + 1)), got
