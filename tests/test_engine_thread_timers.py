"""A POSIX timer that notifies one thread (SIGEV_THREAD_ID), as glibc's
SIGEV_THREAD timers do through their helper thread (vim's): restored
targeting the same thread, which comes back with its TID, and it keeps
waking that thread. Refused before ("notifies signal to tid N")."""

from __future__ import annotations

import os
import time

from engine.context import Options
from engine.dump import check, dump
from engine.restore import restore
from engine_core_support import procs, python_exe, wait_for  # noqa: F401

# The main thread blocks SIGRTMIN+2 and creates a periodic timer notifying
# the worker thread by TID; the worker takes the signals with sigwaitinfo
# and counts them (si_value checked) into a file.
TARGET = r'''
import ctypes, os, signal, struct, threading, time
libc = ctypes.CDLL(None, use_errno=True)
SIG = signal.SIGRTMIN + 2
signal.pthread_sigmask(signal.SIG_BLOCK, [SIG])
tid = []
def worker():
    tid.append(threading.get_native_id())
    n = 0
    while True:
        info = signal.sigwaitinfo([SIG])
        n += 1
        with open("count.tmp", "w") as f:
            f.write(f"{n} {info.si_code}")
        os.rename("count.tmp", "count")
threading.Thread(target=worker, daemon=True).start()
while not tid:
    time.sleep(0.01)
ev = struct.pack("<QiiI", 0x5eed, SIG, 4, tid[0]).ljust(64, b"\0")    # SIGEV_THREAD_ID
timerid = ctypes.c_int()
assert libc.timer_create(1, ctypes.c_char_p(ev), ctypes.byref(timerid)) == 0, ctypes.get_errno()
spec = struct.pack("<qqqq", 0, 300_000_000, 0, 300_000_000)              # every 0.3 s
assert libc.timer_settime(timerid, 0, ctypes.c_char_p(spec), None) == 0
with open("ready.tmp", "w") as f:
    f.write(str(tid[0]))
os.rename("ready.tmp", "ready")
while True:
    time.sleep(1)
'''


def _count(tmp_path) -> int:
    return int((tmp_path / "count").read_text().split()[0])


def test_timer_notifying_a_thread_is_restored_and_keeps_waking_it(procs, tmp_path):
    (tmp_path / "t.py").write_text(TARGET)
    p = procs.start([python_exe(), str(tmp_path / "t.py")], cwd=str(tmp_path))
    wait_for(lambda: (tmp_path / "ready").exists() and (tmp_path / "count").exists(), what="the timer firing")
    tid = int((tmp_path / "ready").read_text())
    timers = open(f"/proc/{p.pid}/timers").read()
    assert f"notify:\tsignal/tid.{tid}" in timers.replace(" ", "\t") or f"tid.{tid}" in timers, timers
    # A freeze that catches the timer's signal pending (or an overrun) is
    # refused by design; tried again a few times, between two expiries.
    from engine.errors import Refusal, Refusals
    for attempt in range(8):
        rep = check(p.pid, Options())
        timing = [r for r in rep["refusals"] if "POSIX timer" in r["message"] and
                  ("pending" in r["message"] or "overrun" in r["message"])]
        assert rep["refusals"] == timing, rep["refusals"]
        if timing:
            continue
        try:
            dump(p.pid, str(tmp_path / "img"), Options())
            break
        except (Refusal, Refusals) as e:
            assert "POSIX timer" in str(e), e
    else:
        raise AssertionError("every freeze met the timer's signal pending")
    p.wait()
    n = _count(tmp_path)
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    assert f"tid.{tid}" in open(f"/proc/{p.pid}/timers").read()
    wait_for(lambda: _count(tmp_path) >= n + 4, what="the restored timer waking the thread")
    assert (tmp_path / "count").read_text().split()[1] == "-2"      # SI_TIMER: from the timer
