"""exec of a memfd after a restore (zdtm memfd04/05): the memfd_create'd
file does not count as a writer of its inode (exec of it works while it is
open O_RDWR); a reopen for writing does (exec fails ETXTBSY). The restore
reopened every fd and writable mapping of a memfd, so a process that
exec'd its memfd before the dump failed to after it. Now a memfd whose
writers did not count at the dump gets its writable fds and mappings from
the new memfd's own file; one with a counted writer (a reopen O_RDWR)
still fails exec after the restore as before it. Proven from inside: the
process forks and fexecve()s its memfd on each SIGUSR1."""

from __future__ import annotations

import os
import signal

import pytest

from engine.context import Options
from engine.dump import dump
from engine.restore import restore
from engine_core_support import procs, start_ready_script, wait_for  # noqa: F401

SETUP = """
import mmap, signal
fd = os.memfd_create('somename', 0)
os.write(fd, b'#!/bin/true\\n')
os.ftruncate(fd, 4096)              # (python's mmap wants the length inside the file)
keep = []
if '{mode}' == 'maps':          # memfd05: a read-only reopen mapped private, the memfd mapped shared
    ro = os.open('/proc/self/fd/%d' % fd, os.O_RDONLY)
    keep += [ro, mmap.mmap(ro, 4096, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE),
             mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)]
if '{mode}' == 'reopened':      # a second open for writing: a counted writer
    keep.append(os.open('/proc/self/fd/%d' % fd, os.O_RDWR))
os.set_inheritable(fd, True)
def probe(*a):
    pid = os.fork()
    if pid == 0:
        try:
            os.execve(fd, ['true'], {{}})
        except OSError as e:
            os._exit(e.errno)
    st = os.waitpid(pid, 0)[1]
    open('result.tmp', 'w').write(str(os.waitstatus_to_exitcode(st)))
    os.rename('result.tmp', 'result')
signal.signal(signal.SIGUSR1, probe)
"""


def _probe(pid: int, cwd) -> int:
    res = cwd / "result"
    if res.exists():
        res.unlink()
    os.kill(pid, signal.SIGUSR1)
    wait_for(res.exists, what="the exec probe")
    return int(res.read_text())


@pytest.mark.parametrize("mode, want", [("fd", 0), ("maps", 0), ("reopened", 26)])   # 26: ETXTBSY
def test_exec_of_a_memfd_after_restore(procs, tmp_path, mode, want):  # noqa: F811
    p = start_ready_script(procs, tmp_path, SETUP.format(mode=mode))
    assert _probe(p.pid, tmp_path) == want
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    assert _probe(p.pid, tmp_path) == want
