"""One step of an image build: a subprocess with its output in the build log.

Shared by the rootfs stage (:mod:`vm.rootfs`) and the image stage
(:mod:`vm.image`); tests replace :func:`run_step` to simulate failures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .errors import VmError

Progress = Callable[[str], None]

#: Seconds between "still running" lines: an arm64 mmdebstrap runs ~20 min.
HEARTBEAT_S = 15


def run_step(argv: List[str], log: Path, say: Progress, stage: str,
             env: Optional[Dict[str, str]] = None) -> None:
    """Run ``argv`` with stdout+stderr appended to ``log``; a heartbeat every
    :data:`HEARTBEAT_S` seconds naming the log's last line. ``env`` adds to
    the environment. Interrupted, the step's whole process group is killed
    (mmdebstrap's dpkg children too, not just the leader).

    Raises:
        VmError(kind="image"): non-zero exit, with the log's tail.
    """
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **env) if env else None, start_new_session=True)
        t0 = time.monotonic()
        try:
            while True:
                try:
                    rc = proc.wait(timeout=HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:
                    say(f"{stage}: still running ({time.monotonic() - t0:.0f} s) {last_line(log)}")
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group start_new_session made
            except ProcessLookupError:
                pass
            proc.wait()
            raise
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise VmError(f"image build step {stage} failed (log: {log})", kind="image",
                      command=argv, rc=rc, stderr=tail)


def last_line(log: Path, width: int = 70) -> str:
    """The log's last non-empty line, shortened: progress people can read."""
    try:
        with open(log, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    text = lines[-1].strip()
    return "| " + (text if len(text) <= width else text[:width - 3] + "...")
