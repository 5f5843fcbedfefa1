"""harness/targets.py ZERO_FREE_CODE: what a guest runs before its golden
snapshot. Here with a margin that leaves it a few MiB to map (never the
host's free memory): it maps them populated and exits cleanly; with a
margin above the free total it maps nothing."""

from __future__ import annotations

import subprocess
import sys

from harness.targets import ZERO_FREE_CODE


def _free_kb() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemFree:"))


def _run(margin_kb: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ZERO_FREE_CODE + "\nprint(n)", str(margin_kb)],
                          capture_output=True, text=True, close_fds=True, timeout=60)


def test_it_maps_the_free_memory_less_the_margin():
    r = _run(_free_kb() - (8 << 10))
    assert r.returncode == 0, r.stderr
    n = int(r.stdout)
    assert 0 < n <= 64 << 20 and n % 4096 == 0     # about 8 MiB (free memory moves meanwhile)


def test_nothing_when_the_margin_exceeds_the_free_memory():
    r = _run(_free_kb() + (1 << 20))
    assert r.returncode == 0 and int(r.stdout) <= 0, r.stderr
