"""engine/cli.py leave(): the command's exit without the interpreter's
finalization must still do what finalization would have done for it:
buffered output flushed, non-daemon threads waited for, exit handlers
run, the exit status the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(code: str, tmp_path: Path):
    return subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[0] = {str(REPO)!r}\n" + code],
                          capture_output=True, timeout=60, cwd=str(tmp_path), close_fds=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})   # buffered, as usual


def test_buffered_output_is_flushed_and_the_status_kept(tmp_path):
    r = _run("from engine.cli import leave\nprint('to a pipe', end='')\nsys.stderr.write('err')\nleave(300)",
             tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (300 & 0xFF, b"to a pipe", b"err")


def test_a_running_thread_is_waited_for(tmp_path):
    out = tmp_path / "done"
    r = _run("import threading, time\nfrom engine.cli import leave\n"
             f"t = threading.Thread(target=lambda: (time.sleep(0.3), open({str(out)!r}, 'w').write('x')))\n"
             "t.start()\nleave(0)", tmp_path)
    assert r.returncode == 0 and out.read_text() == "x"


def test_exit_handlers_still_run(tmp_path):
    r = _run("import atexit\nfrom engine.cli import leave\natexit.register(lambda: print('handler'))\nleave(4)",
             tmp_path)
    assert (r.returncode, r.stdout) == (4, b"handler\n")


def test_the_cli_exits_as_before(tmp_path):
    r = subprocess.run([sys.executable, "-S", "-m", "engine", "--version"], capture_output=True, timeout=60,
                       cwd=str(REPO), close_fds=True)
    assert r.returncode == 0 and r.stdout.startswith(b"ckpt ")
    r = subprocess.run([sys.executable, "-S", "-m", "engine", "dump", "-t", "0", "-D", str(tmp_path / "x")],
                       capture_output=True, timeout=60, cwd=str(REPO), close_fds=True)
    assert r.returncode == 2 and b"ckpt: error" in r.stderr and not (tmp_path / "x").exists()
