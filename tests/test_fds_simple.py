"""eventfd, signalfd, timerfd: restored exactly from fdinfo, or refused."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import time

import pytest

from engine.errors import Refusal
from engine.fds import _sys

from fds_support import Target, classify, dump, restore

EFD = "fd = libc.eventfd({init}, {flags}); os.dup2(fd, 500); os.close(fd)"


@pytest.mark.parametrize("semaphore", [False, True])
def test_eventfd_counter_and_flags(tmp_path, semaphore):
    flags = (1 if semaphore else 0) | os.O_NONBLOCK
    with Target(tmp_path, EFD.format(init=7, flags=flags)) as t:
        assert "eventfd count 7" in classify(t.pid, 500)
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        assert fcntl.fcntl(500, fcntl.F_GETFL) & os.O_NONBLOCK
        if semaphore:
            assert [struct.unpack("Q", os.read(500, 8))[0] for _ in range(7)] == [1] * 7
        else:
            assert struct.unpack("Q", os.read(500, 8))[0] == 7
        with pytest.raises(BlockingIOError):
            os.read(500, 8)


def test_eventfd_large_counter(tmp_path):
    big = (1 << 40) + 5
    setup = EFD.format(init=0, flags=0) + f"; os.write(500, struct.pack('Q', {big}))"
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        assert not fcntl.fcntl(500, fcntl.F_GETFL) & os.O_NONBLOCK
        assert struct.unpack("Q", os.read(500, 8))[0] == big


def test_signalfd_mask_and_flags(tmp_path):
    setup = """
mask = (ctypes.c_uint64 * 16)(); mask[0] = (1 << 9) | (1 << 14)     # SIGUSR1, SIGTERM
fd = libc.signalfd(-1, mask, os.O_NONBLOCK); os.dup2(fd, 500); os.close(fd)
"""
    with Target(tmp_path, setup) as t:
        assert classify(t.pid, 500) == "signalfd mask SIGUSR1,SIGTERM"
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        with open("/proc/self/fdinfo/500") as f:
            assert "sigmask:\t0000000000004200" in f.read()
        assert fcntl.fcntl(500, fcntl.F_GETFL) & os.O_NONBLOCK


TFD = """
class ts(ctypes.Structure): _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
class its(ctypes.Structure): _fields_ = [("i", ts), ("v", ts)]
fd = libc.timerfd_create({clock}, 0)
v = its(ts({isec}, 0), ts({vsec}, {vns}))
assert libc.timerfd_settime(fd, {flags}, ctypes.byref(v), None) == 0
os.dup2(fd, 500); os.close(fd)
"""


def test_timerfd_armed_periodic_rearmed_with_remaining(tmp_path):
    with Target(tmp_path, TFD.format(clock=1, isec=3, vsec=100, vns=0, flags=0)) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        remaining, interval = _sys.timerfd_gettime(500)
        assert interval == 3 * 10**9
        assert 95 * 10**9 < remaining <= 100 * 10**9
        with open("/proc/self/fdinfo/500") as f:
            text = f.read()
        assert "clockid: 1" in text and "ticks: 0" in text


def test_timerfd_disarmed_stays_disarmed(tmp_path):
    with Target(tmp_path, TFD.format(clock=0, isec=0, vsec=0, vns=0, flags=0)) as t:
        assert "disarmed" in classify(t.pid, 500)
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        assert _sys.timerfd_gettime(500) == (0, 0)
        with open("/proc/self/fdinfo/500") as f:
            assert "clockid: 0" in f.read()


def test_timerfd_realtime_abstime_keeps_deadline(tmp_path):
    deadline = int(time.time()) + 1000
    with Target(tmp_path, TFD.format(clock=0, isec=0, vsec=deadline, vns=0, flags=1)) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        remaining, _ = _sys.timerfd_gettime(500)
        assert abs((time.time() + remaining / 1e9) - deadline) < 0.5
        with open("/proc/self/fdinfo/500") as f:
            assert "settime flags: 01" in f.read()


def test_timerfd_one_unread_oneshot_expiry_restored(tmp_path):
    setup = TFD.format(clock=1, isec=0, vsec=0, vns=1000, flags=0) + "\ntime.sleep(0.05)"
    with Target(tmp_path, setup) as t:
        assert "1 unread expiration" in classify(t.pid, 500)
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        assert _sys.timerfd_gettime(500) == (0, 0)
        assert struct.unpack("Q", os.read(500, 8))[0] == 1


def test_timerfd_periodic_with_unread_ticks_keeps_them(tmp_path):
    # 1 ms period, never read: the count grows while the target is frozen;
    # what was counted at the dump comes back (TFD_IOC_SET_TICKS) and the
    # timer goes on ticking.
    setup = TFD.format(clock=1, isec=0, vsec=0, vns=1000, flags=0).replace("its(ts(0, 0)", "its(ts(0, 1000000)")
    setup += "\ntime.sleep(0.05)"
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    rec = [r for r in json.load(open(os.path.join(img, "fds.json"))) if r["fd"] == 500][0]
    assert rec["ticks"] >= 2 and rec["interval_ns"] == 1000000
    with restore(img):
        assert _sys.timerfd_gettime(500)[1] == 1000000
        assert struct.unpack("Q", os.read(500, 8))[0] >= rec["ticks"]


def test_timerfd_long_period_fired_once(tmp_path):
    # Fired once, next expiry 30 s away: exactly one unread tick, still armed.
    setup = TFD.format(clock=1, isec=0, vsec=0, vns=1000, flags=0).replace("its(ts(0, 0)", "its(ts(30, 0)")
    setup += "\ntime.sleep(0.05)"
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        remaining, interval = _sys.timerfd_gettime(500)
        assert interval == 30 * 10**9 and 25 * 10**9 < remaining <= 30 * 10**9
        assert struct.unpack("Q", os.read(500, 8))[0] == 1


def test_timerfd_cancel_on_set_refused(tmp_path):
    deadline = int(time.time()) + 1000
    with Target(tmp_path, TFD.format(clock=0, isec=0, vsec=deadline, vns=0, flags=3)) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert "TFD_TIMER_CANCEL_ON_SET" in ei.value.detail
