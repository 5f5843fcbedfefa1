"""Classic BPF socket filters on every kind of socket (engine/fds/_sockfilter.py):
the same program attached again, locked if it was, and doing its work
after the restore; an eBPF one refused. zdtm sock_filter00/01 too."""

from __future__ import annotations

import pytest

from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine_core_support import procs  # noqa: F401
from fds_support import ask_verdict, dump_restore, start_worker

COMMON = r'''
import ctypes, json, os, select, signal, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]
def attach(s, prog):
    arr = (Insn * len(prog))(*[Insn(*i) for i in prog])
    fp = Fprog(len(prog), ctypes.cast(arr, ctypes.POINTER(Insn)))
    assert libc.setsockopt(s.fileno(), socket.SOL_SOCKET, 26, ctypes.byref(fp), ctypes.sizeof(fp)) == 0
def program(s):
    n = ctypes.c_uint(0)
    assert libc.getsockopt(s.fileno(), socket.SOL_SOCKET, 26, None, ctypes.byref(n)) == 0
    buf = (Insn * max(n.value, 1))()
    if n.value:
        assert libc.getsockopt(s.fileno(), socket.SOL_SOCKET, 26, buf, ctypes.byref(n)) == 0
    return [[i.code, i.jt, i.jf, i.k] for i in buf[:n.value]]
def serve(check):
    def on_usr1(*_):
        with open("verdict.json.tmp", "w") as f:
            json.dump(check(), f)
        os.rename("verdict.json.tmp", "verdict.json")
    signal.signal(signal.SIGUSR1, on_usr1)
    open("ready", "w").close()
    while True:
        signal.pause()
'''

DROP_ALL = [[0x06, 0, 0, 0]]                                  # ret #0
# ld len; jgt #N -> ret #0 (dropped) | ret #0xffff: only packets of at most N bytes (a UDP
# socket's filter sees the UDP header, 8 bytes, too): only "ab" of "ab" and "longer" passes
SHORT_ONLY = [[0x80, 0, 0, 0], [0x25, 0, 1, 3], [0x06, 0, 0, 0], [0x06, 0, 0, 0xFFFF]]
SHORT_UDP = [[0x80, 0, 0, 0], [0x25, 0, 1, 11], [0x06, 0, 0, 0], [0x06, 0, 0, 0xFFFF]]

FILTERS = COMMON + r'''
DROP_ALL, SHORT_ONLY, SHORT_UDP = %r, %r, %r
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
attach(u, DROP_ALL)
u.setsockopt(socket.SOL_SOCKET, 44, 1)                        # SO_LOCK_FILTER
v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); v.bind(("127.0.0.1", 0))
attach(v, SHORT_UDP)
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
attach(b, SHORT_ONLY)
t = socket.socket()                                           # a TCP socket never connected
attach(t, DROP_ALL)
def got(s, sender):
    sender(b"ab"); sender(b"longer")
    out = []
    while select.select([s], [], [], 0.3)[0]:
        out.append(s.recv(100).decode())
    return out
def check():
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return {"progs": [program(x) for x in (u, v, b, t)],
            "locked": [x.getsockopt(socket.SOL_SOCKET, 44) for x in (u, v, b, t)],
            "u": got(u, lambda d: tx.sendto(d, u.getsockname())),
            "v": got(v, lambda d: tx.sendto(d, v.getsockname())),
            "b": got(b, a.send)}
serve(check)
''' % (DROP_ALL, SHORT_ONLY, SHORT_UDP)

EBPF = COMMON + r'''
class Attr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("pad", ctypes.c_char * 96)]
insns = (ctypes.c_uint64 * 2)(0x00000000000000b7, 0x0000000000000095)   # r0 = 0; exit
lic = ctypes.create_string_buffer(b"GPL")
attr = Attr(1, 2, ctypes.addressof(insns), ctypes.addressof(lic))        # BPF_PROG_TYPE_SOCKET_FILTER
prog = libc.syscall(321, 5, ctypes.byref(attr), ctypes.sizeof(attr))      # bpf(BPF_PROG_LOAD)
assert prog >= 0, os.strerror(ctypes.get_errno())
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, 50, prog)                     # SO_ATTACH_BPF
os.close(prog)
serve(lambda: {})
'''


def test_classic_filters_restored_on_every_kind_locked_as_they_were(procs, tmp_path):
    p, _ = start_worker(procs, tmp_path, [], FILTERS, ready_json=False)
    before = ask_verdict(p.pid, tmp_path)
    assert before["progs"] == [DROP_ALL, SHORT_UDP, SHORT_ONLY, DROP_ALL]
    assert before["locked"] == [1, 0, 0, 0] and before["u"] == [] and before["v"] == ["ab"] == before["b"]
    dump_restore(procs, p, str(tmp_path / "img"))
    assert ask_verdict(p.pid, tmp_path) == before


def test_an_ebpf_filter_is_refused_and_the_process_left_unharmed(procs, tmp_path):
    import os
    import platform
    if platform.machine() != "x86_64":
        pytest.skip("the bpf(2) number here is x86_64's")
    p, _ = start_worker(procs, tmp_path, [], EBPF, ready_json=False)
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    refusals = getattr(ei.value, "refusals", [ei.value])
    assert [r.reason for r in refusals] == ["socket"] and "eBPF" in refusals[0].message
    assert ask_verdict(p.pid, tmp_path) == {} and os.path.exists(f"/proc/{p.pid}")
