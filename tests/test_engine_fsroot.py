"""A chrooted process comes back chrooted (engine/fsroot.py; zdtm chroot,
chroot-file): refused before. Proven from inside: on SIGUSR1 it opens a
file by its path inside the jail, stats its "/" and its cwd, and writes
what it saw through an fd opened before the chroot. A root directory
replaced before the restore is refused before any process exists."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import procs, start_ready_script, wait_for  # noqa: F401

SETUP = """
import signal
os.mkdir('jail')
open('jail/inside.txt', 'w').write('in the jail')
out = os.open('seen', os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.chroot('jail')
def probe(*a):
    {chdir}       # (at the first probe: 'ready' is written where the test looks)
    st, cwd = os.stat('/'), os.stat('.')
    os.write(out, ('%s|%d|%d\\n' % (open('/inside.txt').read(), st.st_ino, cwd.st_ino)).encode())
signal.signal(signal.SIGUSR1, probe)
"""


def _seen(pid: int, cwd) -> str:
    f = cwd / "seen"
    n = len(f.read_text().splitlines()) if f.exists() else 0
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: f.exists() and len(f.read_text().splitlines()) > n, what="the probe")
    return f.read_text().splitlines()[n]


@pytest.mark.parametrize("chdir", ["pass", "os.chdir('/')"])
def test_chrooted_process_comes_back_chrooted(procs, tmp_path, chdir):  # noqa: F811
    p = start_ready_script(procs, tmp_path, SETUP.format(chdir=chdir), "os, time")
    before = _seen(p.pid, tmp_path)
    assert before.startswith("in the jail|") and before.split("|")[1] == str(os.stat(tmp_path / "jail").st_ino)
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    assert _seen(p.pid, tmp_path) == before


def test_replaced_root_is_refused_at_restore(procs, tmp_path):  # noqa: F811
    p = start_ready_script(procs, tmp_path, SETUP.format(chdir="os.chdir('/')"), "os, time")
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    shutil.rmtree(tmp_path / "jail")
    os.mkdir(tmp_path / "jail")
    with pytest.raises((Refusal, Refusals)) as e:
        restore(str(tmp_path / "img"), Options())
    assert "file-changed" in str(e.value) and "root directory" in str(e.value)
    assert not os.path.exists(f"/proc/{p.pid}")


def test_root_bound_from_ckpts_own_root_comes_back_chrooted(procs, tmp_path):  # noqa: F811
    """A jail that is a bind mount of ckpt's own root directory: the same
    device and inode as ckpt's /, another mount (it has none of the mounts
    below /: no /proc in it). Was taken for ckpt's root by (device, inode)
    alone and the process came back unchrooted, /proc and all visible."""
    import subprocess
    jail = tmp_path / "bound"
    jail.mkdir()
    r = subprocess.run(["mount", "--bind", "/", str(jail)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount /: {r.stderr.strip()}")
    try:
        p = start_ready_script(procs, tmp_path, f"os.chroot({str(jail)!r})", "os, time")
        before = os.readlink(f"/proc/{p.pid}/root")
        assert before == str(jail) and not os.path.exists(f"/proc/{p.pid}/root/proc/self")
        dump(p.pid, str(tmp_path / "img"), Options())
        p.wait()
        restore(str(tmp_path / "img"), Options())
        procs.adopt(p.pid)
        assert os.readlink(f"/proc/{p.pid}/root") == before
        assert not os.path.exists(f"/proc/{p.pid}/root/proc/self")
    finally:
        procs.cleanup()
        subprocess.run(["umount", str(jail)], capture_output=True)
