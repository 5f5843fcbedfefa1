"""harness/targets.py ZERO_FREE_CODE: what a guest runs right before its
golden snapshot. Run here against a made-up /proc/meminfo and a recording
mmap (never the host's own free memory, which other processes move): it
maps the free memory less the margin, populated, and unmaps it; nothing
when the margin is more than is free."""

from __future__ import annotations

import io
import mmap
import sys
import types

from harness.targets import ZERO_FREE_CODE


def _run(monkeypatch, free_kb: int, margin_kb: int) -> list:
    calls = []

    class Mapping:
        def close(self):
            calls.append("close")

    def fake_mmap(fileno, length, flags=0):
        calls.append((fileno, length, flags))
        return Mapping()
    fake = types.SimpleNamespace(mmap=fake_mmap, MAP_PRIVATE=mmap.MAP_PRIVATE, MAP_ANONYMOUS=mmap.MAP_ANONYMOUS,
                                 MAP_POPULATE=getattr(mmap, "MAP_POPULATE", 0x8000))
    monkeypatch.setitem(sys.modules, "mmap", fake)
    monkeypatch.setattr(sys, "argv", ["-c", str(margin_kb)])
    meminfo = f"MemTotal:  480272 kB\nMemFree:  {free_kb} kB\nMemAvailable: 410964 kB\n"
    exec(ZERO_FREE_CODE, {"__builtins__": __builtins__, "open": lambda path: io.StringIO(meminfo)})
    return calls


def test_it_maps_the_free_memory_less_the_margin_populated_and_lets_it_go(monkeypatch):
    calls = _run(monkeypatch, 376132, 24 << 10)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0x8000)
    assert calls == [(-1, (376132 - (24 << 10)) // 4 * 4096, flags), "close"]


def test_nothing_when_the_margin_exceeds_the_free_memory(monkeypatch):
    assert _run(monkeypatch, 20000, 24 << 10) == []
