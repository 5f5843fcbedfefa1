"""``pty``: a pseudo-terminal. ``pty: pair``: the workload holds the master
(``fd``) and the slave (``slave_fd``); ``ctty: true`` opens the slave
without O_NOCTTY, so it becomes the (setsid) workload's controlling
terminal. The slave is put in raw mode (non-canonical, no echo, no
translations) unless ``canonical: true``; ``packet: true`` turns on packet
mode; ``input`` bytes wait for the slave's reader (written on the master),
``output`` bytes for the master's (written on the slave);
``pending_status: true`` leaves a packet-mode status byte unread (a
flush); ``slave_outside: true`` lets a process outside the dump hold the
slave too; in canonical
mode the input is one text line (``partial_line: true``: not ended yet,
which user space cannot see: scenarios-found); ``winsize:
[rows, cols]``. ``pty: outside``: only the slave (at ``fd``), its master
held by a process outside the dump.

The checker compares the index (``/dev/pts/N``), termios and window size
with what the workload set, the controlling terminal and foreground group,
packet mode, both queues byte for byte, then a marker each way.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import termios

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import MARKER, Ctx, Opened, bytes_check, check, seeded_bytes

KIND = "pty"
TAGS = ("tty",)
TIOCGPTN, TIOCSPTLCK, TIOCPKT, TIOCGPKT = 0x80045430, 0x40045431, 0x5420, 0x80045438


def fields(s) -> dict:
    return {"pty": s.Enum(("pair", "outside")), "slave_fd": s.FdNum(), "ctty": s.Bool(), "canonical": s.Bool(),
            "packet": s.Bool(), "partial_line": s.Bool(),
            "pending_status": s.Bool(), "slave_outside": s.Bool(), "input": s.Data(), "output": s.Data(), "winsize": s.List_(s.Int(0, 65535))}


def fd_numbers(e: dict) -> List[int]:
    return [e["fd"]] + ([e["slave_fd"]] if "slave_fd" in e else [])


def validate(e: dict, fds: dict) -> List[tuple]:
    if e["pty"] == "pair" and "slave_fd" not in e:
        return [("slave_fd", "a pty pair needs slave_fd")]
    if e["pty"] == "outside" and any(k in e for k in ("slave_fd", "packet", "input", "output", "ctty")):
        return [("pty", "an outside pty has only its slave, at fd")]
    if e.get("pending_status") and not e.get("packet"):
        return [("pending_status", "only a packet-mode master has a status byte")]
    if e.get("partial_line") and not e.get("canonical"):
        return [("partial_line", "only a canonical-mode pty has lines")]
    if e.get("canonical") and "output" in e:
        return [("output", "a canonical-mode pty's master holds the echo of its input; no output")]
    if "winsize" in e and len(e["winsize"]) != 2:
        return [("winsize", "expected [rows, cols]")]
    return []


def _attrs(fd: int) -> list:
    """tcgetattr as JSON-able ints (the cc array holds bytes)."""
    a = termios.tcgetattr(fd)
    return a[:6] + [[c[0] if isinstance(c, bytes) else c for c in a[6]]]


def _int(fd: int, req: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, req, b"\0" * 4))[0]


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    m = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
    fcntl.ioctl(m, TIOCSPTLCK, struct.pack("i", 0))
    index = _int(m, TIOCGPTN)
    s = os.open(f"/dev/pts/{index}", os.O_RDWR | (0 if e.get("ctty") else os.O_NOCTTY))
    attrs = termios.tcgetattr(s)
    if not e.get("canonical"):
        attrs[0] &= ~(termios.ICRNL | termios.IXON | termios.ISTRIP | termios.INLCR | termios.IGNCR)
        attrs[1] &= ~termios.OPOST
        attrs[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
    attrs[6][termios.VINTR] = 7      # not the default: a reset termios shows
    termios.tcsetattr(s, termios.TCSANOW, attrs)
    rows, cols = e.get("winsize", [24, 80])
    fcntl.ioctl(m, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    if e.get("packet"):
        fcntl.ioctl(m, TIOCPKT, struct.pack("i", 1))
    extra = {"index": index, "attrs": _attrs(s), "winsize": [rows, cols]}
    if e["pty"] == "outside":
        from .pipe import _spawn_holder
        ctx.helpers.append(_spawn_holder(m))
        os.close(m)
        return [Opened(s, int(e["fd"]), "slave", extra)]
    if e.get("pending_status"):
        termios.tcflush(s, termios.TCIOFLUSH)       # the master reads a TIOCPKT_FLUSH* status byte next
    if e.get("slave_outside"):
        from .pipe import _spawn_holder
        ctx.helpers.append(_spawn_holder(s))
    _write(m, _input(e))
    _write(s, seeded_bytes(e.get("output")))
    return [Opened(m, int(e["fd"]), "master", extra), Opened(s, int(e["slave_fd"]), "slave", extra)]


def _input(e: dict) -> bytes:
    """What the master writes for the slave: the seeded bytes, or in
    canonical mode one text line of their hex (random bytes would hold
    erase, kill and signal characters)."""
    data = seeded_bytes(e.get("input"))
    if not (e.get("canonical") and data):
        return data
    return data.hex().encode() + (b"" if e.get("partial_line") else b"\n")


def _for_master(e: dict) -> bytes:
    """What waits for the master: the output, or in canonical mode the
    echo of the input line (ECHO on; ONLCR makes its newline \\r\\n)."""
    if e.get("canonical"):
        return _input(e).replace(b"\n", b"\r\n")
    return seeded_bytes(e.get("output"))


def _write(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _fionread(fd: int) -> int:
    return _int(fd, termios.FIONREAD)


def _read(fd: int, n: int, packet: bool) -> bytes:
    """Up to n bytes, never blocking (poll before each read); a packet-mode
    master's reads lead with one status byte, dropped."""
    out = b""
    p = select.poll()
    p.register(fd, select.POLLIN)
    while len(out) < n and p.poll(200):
        got = os.read(fd, n - len(out) + packet)
        out += got[1:] if packet else got
        if not got:
            break
    return out


def _stat_tty(pid: int) -> list:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return [int(rest[4]), int(rest[5])]       # tty_nr, tpgid


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    by_role = {r["role"]: r for r in recs}
    s = by_role["slave"]["fd"]
    m = by_role["master"]["fd"] if "master" in by_role else None
    x = by_role["slave"]["extra"]
    packet = bool(e.get("packet"))
    out = []
    if phase == "inspect":
        out.append(check(s, "slave is /dev/pts/N", f"/dev/pts/{x['index']}", os.ttyname(s)))
        out.append(check(s, "termios", x["attrs"], _attrs(s)))
        out.append(check(s, "window size", x["winsize"],
                         list(struct.unpack("HHHH", fcntl.ioctl(s, termios.TIOCGWINSZ, bytes(8)))[:2])))
        if m is not None:
            out.append(check(m, "master's pty index", x["index"], _int(m, TIOCGPTN)))
            out.append(check(m, "packet mode", int(packet), _int(m, TIOCGPKT)))
            out.append(check(m, "queued for the master", len(_for_master(e)), _fionread(m)))
            # a partial line is not counted (complete lines only)
            out.append(check(s, "queued for the slave", 0 if e.get("partial_line") else len(_input(e)),
                             _fionread(s)))
        if e.get("ctty"):
            dev = os.fstat(s).st_rdev
            nr = (os.major(dev) << 8) | (os.minor(dev) & 0xFF) | ((os.minor(dev) & ~0xFF) << 12)
            out.append(check(s, "controlling terminal, foreground group", [nr, os.getpgrp()],
                             _stat_tty(os.getpid())))
    elif phase == "consume" and m is not None:
        want_out, want_in = _for_master(e), _input(e)
        if e.get("partial_line"):
            # end the line, so the reader gets it (and its echo reaches the master)
            _write(m, b"\n")
            want_in += b"\n"
            want_out += b"\r\n"
        out.append(bytes_check(m, "bytes queued for the master", want_out, _read(m, len(want_out), packet)))
        out.append(bytes_check(s, "bytes queued for the slave", want_in, _read(s, len(want_in), False)))
    elif phase == "mutate" and m is not None:
        _write(s, MARKER)
        want = MARKER.replace(b"\n", b"\r\n") if e.get("canonical") else MARKER     # OPOST|ONLCR
        out.append(check(m, "slave's write reaches the master", want.decode(),
                         _read(m, len(want), packet).decode(errors="replace")))
        _write(m, MARKER)
        out.append(check(s, "master's write reaches the slave", MARKER.decode(),
                         _read(s, len(MARKER), False).decode(errors="replace")))
    return out
