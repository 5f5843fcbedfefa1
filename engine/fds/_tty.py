"""Terminal primitives the tty kind shares: ioctls, termios, and moving a
pty's queued bytes out and back in without losing them.

A terminal queue cannot be peeked (FIONREAD counts it, nothing reads it
without consuming), so a queue is *drained and re-injected*: read from the
side that would read it, then written again from the other side with the
line discipline's processing of those bytes turned off for the moment, so
they land in the same queue byte for byte (ENGINE-NOTES-style facts from
drivers/tty/n_tty.c and pty.c):

* a pty master's termios ioctls act on the slave (tty_mode_ioctl uses
  tty->link), and so do TIOCGWINSZ/TIOCGSID/TIOCGPGRP: one master fd reads
  every setting of the pair;
* bytes the slave wrote wait in the master's n_tty read buffer; the master
  side is always raw (pty_unix98_install), so FIONREAD is exact. Written
  again on the slave with OPOST off, they arrive unchanged;
* bytes the master wrote wait in the slave's read buffer after input
  processing; in non-canonical mode FIONREAD is exact. Written again on
  the master with ECHO, ISIG, IEXTEN and the input translations off (ICANON
  untouched: flipping it would re-split the buffer, n_tty_set_termios),
  they arrive unchanged. In canonical mode FIONREAD counts complete lines
  only, and a line still being typed is invisible: refused when anything
  is counted, see Known limits for the partial line;
* the re-injected bytes reach the other side through the flip buffer's
  work queue: wait until FIONREAD shows them all.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import struct
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Optional, Tuple

# include/uapi/asm-generic/ioctls.h (x86_64 and aarch64 alike)
TCGETS2, TCSETS2 = 0x802C542A, 0x402C542B
TIOCEXCL, TIOCSCTTY, TIOCGPGRP, TIOCSPGRP = 0x540C, 0x540E, 0x540F, 0x5410
TIOCGWINSZ, TIOCSWINSZ, FIONREAD, TIOCPKT, TIOCSTI = 0x5413, 0x5414, 0x541B, 0x5420, 0x5412
TIOCGSID, TIOCGPTN, TIOCSPTLCK, TIOCGETD = 0x5429, 0x80045430, 0x40045431, 0x5424
TIOCGPKT, TIOCGPTLCK, TIOCGEXCL, TIOCGPTPEER = 0x80045438, 0x80045439, 0x80045440, 0x5441

PTMX_RDEV = (5, 2)
DEVTTY_RDEV = (5, 0)
PTS_MAJORS = range(136, 144)          # UNIX98_PTY_SLAVE_MAJOR .. + UNIX98_PTY_MAJOR_COUNT

# termios bits (include/uapi/asm-generic/termbits.h)
IGNBRK, BRKINT, PARMRK, ISTRIP, INLCR, IGNCR, ICRNL, IUCLC, IXON, IXANY = (
    0o1, 0o2, 0o10, 0o40, 0o100, 0o200, 0o400, 0o1000, 0o2000, 0o4000)
OPOST = 0o1
ISIG, ICANON, ECHO, ECHONL, IEXTEN, EXTPROC = 0o1, 0o2, 0o10, 0o100, 0o100000, 0o200000
VSTART, VSTOP = 8, 9
_T2 = struct.Struct("<IIIIB19sII")     # struct termios2
DRAIN_WAIT = 2.0                       # seconds for re-injected bytes to land


def is_master(rdev: int) -> bool:
    return (os.major(rdev), os.minor(rdev)) == PTMX_RDEV


def slave_index(rdev: int) -> Optional[int]:
    """The pty index of a /dev/pts/N device number, or None."""
    if os.major(rdev) not in PTS_MAJORS:
        return None
    return (os.major(rdev) - PTS_MAJORS.start) * 256 + os.minor(rdev)


def ioc_int(fd: int, req: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, req, buf, True)
    return buf[0]


def ioc_call(fd: int, req: int, arg: int = 0) -> int:
    """An ioctl with an integer argument; returns its result (TIOCGPTPEER: an fd)."""
    return fcntl.ioctl(fd, req, arg)


def set_int(fd: int, req: int, value: int) -> None:
    fcntl.ioctl(fd, req, struct.pack("i", value))


def get_termios(fd: int) -> bytes:
    return bytes(fcntl.ioctl(fd, TCGETS2, bytes(_T2.size)))


def set_termios(fd: int, raw: bytes) -> None:
    fcntl.ioctl(fd, TCSETS2, raw)


def fields(raw: bytes) -> dict:
    i, o, c, l, line, cc, ispeed, ospeed = _T2.unpack(raw)
    return {"iflag": i, "oflag": o, "cflag": c, "lflag": l, "line": line, "cc": cc, "ispeed": ispeed,
            "ospeed": ospeed}


def with_flags(raw: bytes, iflag: int = None, oflag: int = None, lflag: int = None) -> bytes:
    f = fields(raw)
    return _T2.pack(f["iflag"] if iflag is None else iflag, f["oflag"] if oflag is None else oflag, f["cflag"],
                    f["lflag"] if lflag is None else lflag, f["line"], f["cc"], f["ispeed"], f["ospeed"])


def canonical(raw: bytes) -> bool:
    f = fields(raw)
    return bool(f["lflag"] & ICANON) and not f["lflag"] & EXTPROC


def get_winsize(fd: int) -> Tuple[int, int, int, int]:
    return struct.unpack("HHHH", fcntl.ioctl(fd, TIOCGWINSZ, bytes(8)))


def set_winsize(fd: int, ws) -> None:
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", *ws))


def maybe_int(fd: int, req: int) -> Optional[int]:
    """An int ioctl that fails with ENOTTY when there is nothing to report
    (TIOCGSID/TIOCGPGRP on a terminal that is nobody's controlling one)."""
    try:
        return ioc_int(fd, req)
    except OSError as e:
        if e.errno == 25:    # ENOTTY
            return None
        raise


def poll_bits(fd: int) -> int:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLPRI)
    got = p.poll(0)
    return got[0][1] if got else 0


def read_queue(fd: int, packet: bool = False) -> bytes:
    """Every byte queued for reading on `fd` (a dup of the process's own
    file: its O_NONBLOCK is the process's, so only what FIONREAD or poll
    promises is read). In packet mode each read carries a leading
    TIOCPKT_DATA byte, dropped. Raises OSError."""
    out = bytearray()
    for _ in range(1 << 16):
        n = ioc_int(fd, FIONREAD)
        if not n and not poll_bits(fd) & select.POLLIN:
            break
        if not n:
            # poll flushed the flip buffer (n_tty_poll); count again
            n = ioc_int(fd, FIONREAD)
            if not n:
                break
        got = os.read(fd, n + (1 if packet else 0))
        if packet:
            if got[:1] != b"\0":
                raise OSError(0, f"packet-mode status byte {got[:1]!r} read with the data")
            got = got[1:]
        out += got
    return bytes(out)


def wait_queued(fd: int, want: int) -> int:
    """Until FIONREAD on `fd` reaches `want` (re-injected bytes cross the
    flip buffer asynchronously); returns what it shows at the end."""
    deadline = time.monotonic() + DRAIN_WAIT
    while True:
        n = ioc_int(fd, FIONREAD)
        if n >= want or time.monotonic() > deadline:
            return n
        poll_bits(fd)
        time.sleep(0.002)


def write_all(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def inject_output(master: int, slave: int, data: bytes, termios_now: bytes) -> int:
    """`data` back into the master's read queue, written on the slave with
    OPOST off for the moment; returns master FIONREAD afterwards."""
    if not data:
        return ioc_int(master, FIONREAD)
    before = ioc_int(master, FIONREAD)
    f = fields(termios_now)
    set_termios(master, with_flags(termios_now, oflag=f["oflag"] & ~OPOST))
    try:
        write_all(slave, data)
        return wait_queued(master, before + len(data))
    finally:
        set_termios(master, termios_now)


def raw_input_termios(termios_now: bytes, packet: bool) -> bytes:
    """The slave's termios with every processing of received bytes off but
    ICANON as it is. IXON stays as it is in packet mode (pty_set_termios
    reports an IXON change to the master as a packet status)."""
    f = fields(termios_now)
    iflag = f["iflag"] & ~(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IUCLC | IXANY
                           | (0 if packet else IXON))
    return with_flags(termios_now, iflag=iflag, lflag=f["lflag"] & ~(ECHO | ECHONL | ISIG | IEXTEN))


def flow_chars(termios_now: bytes) -> bytes:
    cc = fields(termios_now)["cc"]
    return bytes([cc[VSTART], cc[VSTOP]])


def sti(slave: int, data: bytes) -> None:
    """Bytes into the slave's input, processed at once (TIOCSTI calls the
    line discipline's receive_buf directly; a write on the master goes
    through the flip buffer's work queue, which runs later). Needs
    CAP_SYS_ADMIN (or the tty as controlling terminal)."""
    for b in data:
        fcntl.ioctl(slave, TIOCSTI, bytes([b]))


def may_sti() -> bool:
    """Whether this process may TIOCSTI into a terminal that is not its
    controlling one: CAP_SYS_ADMIN (drivers/tty/tty_io.c tiocsti)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 21 & 1)
    except OSError:
        pass
    return False


def settle(slave: int) -> None:
    """Let bytes the master wrote before reach the slave's line discipline
    (poll on a slave with nothing to read flushes the flip buffer work,
    n_tty_poll), so what is injected next lands behind them."""
    for _ in range(3):
        poll_bits(slave)
        time.sleep(0.005)


def inject_input(master: int, slave: int, data: bytes, termios_now: bytes, packet: bool) -> int:
    """`data` back into the slave's read queue (non-canonical mode), with
    input processing off for the moment; returns slave FIONREAD afterwards."""
    if not data:
        return ioc_int(slave, FIONREAD)
    set_termios(master, raw_input_termios(termios_now, packet))
    try:
        sti(slave, data)
        return ioc_int(slave, FIONREAD)
    finally:
        set_termios(master, termios_now)


class Unexact(Exception):
    """The queue cannot be carried exactly (the message says why)."""


# c_cc indexes (asm-generic/termbits.h)
VINTR, VQUIT, VERASE, VKILL, VEOF, VTIME, VMIN, VSWTC = range(8)
VSUSP, VEOL, VREPRINT, VDISCARD, VWERASE, VLNEXT, VEOL2 = 10, 11, 12, 13, 14, 15, 16


def _probe_termios(termios_now: bytes, packet: bool) -> bytes:
    """For injecting into a canonical-mode line discipline: no echo, no
    signals, no flow control (but in packet mode, see raw_input_termios),
    no input translations, IEXTEN on (VLNEXT quotes special characters);
    ICANON as it is (flipping it re-splits the buffer)."""
    f = fields(termios_now)
    iflag = f["iflag"] & ~(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IUCLC | IXANY
                           | (0 if packet else IXON))
    return with_flags(termios_now, iflag=iflag, lflag=(f["lflag"] & ~(ECHO | ECHONL | ISIG)) | IEXTEN)


def take_canonical(master: int, slave: int, termios_now: bytes, packet: bool):
    """Every line waiting for a canonical-mode reader and the line being
    typed: ([line, ...], partial). The partial line is made readable by
    ending it with VEOF (stored as a line end, returned by no read:
    n_tty canon_copy_from_read_buf), so the last read returns it. Lines
    keep their terminator (newline, VEOL, VEOL2; none: VEOF). The slave's
    queue is empty afterwards: put_canonical puts it back. Raises Unexact
    before anything changed, or after putting back what it moved."""
    cc = fields(termios_now)["cc"]
    if not cc[VEOF]:
        raise Unexact("canonical mode with VEOF disabled: a line being typed cannot be made readable")
    settle(slave)
    set_termios(master, _probe_termios(termios_now, packet))
    try:
        sti(slave, bytes([cc[VEOF]]))
        if not poll_bits(slave) & select.POLLIN:
            # VEOF went in as a plain character: a VLNEXT (^V) was pending.
            # Take it out again (VERASE) and quote the next one again.
            if not cc[VERASE] or not cc[VLNEXT]:
                raise OSError(0, "a pending VLNEXT took VEOF literally and cannot be undone")
            sti(slave, bytes([cc[VERASE], cc[VLNEXT]]))
            raise Unexact("a literal-next (VLNEXT) is pending on the line being typed")
        reads = []
        while poll_bits(slave) & select.POLLIN:
            reads.append(os.read(slave, 1 << 16))
        return reads[:-1], reads[-1]
    finally:
        set_termios(master, termios_now)


def _specials(termios_now: bytes, packet: bool) -> set:
    f = fields(termios_now)
    cc = f["cc"]
    out = {10}
    for i in (VERASE, VKILL, VEOF, VEOL, VEOL2, VWERASE, VREPRINT, VLNEXT):
        if cc[i]:
            out.add(cc[i])
    if packet and f["iflag"] & IXON:
        out.update(c for c in (cc[VSTART], cc[VSTOP]) if c)
    return out


def line_end(line: bytes, termios_now: bytes) -> bool:
    """Whether a line read in canonical mode carries its terminator."""
    cc = fields(termios_now)["cc"]
    return bool(line) and line[-1] in {10} | {c for c in (cc[VEOL], cc[VEOL2]) if c}


def put_canonical(master: int, slave: int, termios_now: bytes, lines, partial: bytes, packet: bool) -> int:
    """Lines and the partial line back into a canonical-mode slave, each
    special character quoted with VLNEXT, each line ended as it was (a
    line without terminator by VEOF). Returns slave FIONREAD (complete
    lines only). Raises Unexact when a special character cannot be quoted."""
    cc = fields(termios_now)["cc"]
    special = _specials(termios_now, packet)

    def quoted(data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if b in special:
                if not cc[VLNEXT]:
                    raise Unexact(f"character {b:#x} is special and VLNEXT is disabled")
                out.append(cc[VLNEXT])
            out.append(b)
        return bytes(out)

    stream = bytearray()
    for line in lines:
        if line_end(line, termios_now):
            stream += quoted(line[:-1]) + line[-1:]
        else:
            stream += quoted(line) + bytes([cc[VEOF]])
    stream += quoted(partial)
    set_termios(master, _probe_termios(termios_now, packet))
    try:
        sti(slave, bytes(stream))
        return ioc_int(slave, FIONREAD)
    finally:
        set_termios(master, termios_now)
