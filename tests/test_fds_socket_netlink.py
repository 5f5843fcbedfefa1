"""NETLINK_ROUTE sockets with nothing queued are rebuilt with the same port
id, groups and options; queued messages, other netlink protocols, packet
and raw sockets are refused with `socket` naming family/type."""

from __future__ import annotations

import os
import socket

import pytest

from engine.errors import Refusal

from fds_support import Target, classify, dump, restore

RTMGRP_LINK, RTMGRP_IPV4_IFADDR = 1, 0x10
RTNLGRP_IPV6_NETCONF = 36         # a group beyond the 32-bit bind mask


def refusal(pid, fd) -> str:
    with pytest.raises(Refusal) as ei:
        classify(pid, fd)
    assert ei.value.reason == "socket" and ei.value.fd == fd
    return ei.value.detail


def test_route_socket_restored_with_port_id_groups_and_options(tmp_path):
    setup = f"""
import socket
n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
n.setsockopt(270, 11, 1)                               # NETLINK_EXT_ACK
n.bind((0, {RTMGRP_LINK | RTMGRP_IPV4_IFADDR}))        # the kernel picks the port id
n.setsockopt(270, 1, {RTNLGRP_IPV6_NETCONF})           # NETLINK_ADD_MEMBERSHIP
u = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)   # never bound: no port id
os.dup2(n.fileno(), 500); os.dup2(u.fileno(), 501); n.close(); u.close()
"""
    with Target(tmp_path, setup, "report['port'] = socket.socket(fileno=os.dup(500)).getsockname()[0]") as t:
        port = t.check()["port"]
        assert classify(t.pid, 500) == f"netlink route raw port {port}, groups 1,5,36, options NETLINK_EXT_ACK"
        assert classify(t.pid, 501) == "netlink route dgram port 0"
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        t.close()
        with restore(img):
            s = socket.socket(fileno=os.dup(500))
            u = socket.socket(fileno=os.dup(501))
            try:
                assert s.getsockname() == (port, RTMGRP_LINK | RTMGRP_IPV4_IFADDR)
                assert s.getsockopt(270, 11) == 1
                assert u.getsockname() == (0, 0)
                # it works: a request is answered on the same port id
                import struct
                req = struct.pack("=IHHII", 32, 18, 0x301, 7, 0) + bytes(16)   # RTM_GETLINK dump
                s.send(req)
                s.settimeout(5)
                hdr = s.recv(65536)
                assert struct.unpack_from("=IHHII", hdr)[3:] == (7, port)
            finally:
                s.close()
                u.close()


def test_route_socket_with_queued_messages_or_a_dump_running_refused(tmp_path):
    setup = """
import socket, struct
n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0); n.bind((0, 0))
n.send(struct.pack("=IHHII", 32, 18, 1, 1, 0) + struct.pack("=BBHiII", 0, 0, 0, 1, 0, 0))  # RTM_GETLINK lo
import time; time.sleep(0.2)
os.dup2(n.fileno(), 500)
"""
    with Target(tmp_path, setup) as t:
        d = refusal(t.pid, 500)
        assert d.startswith("netlink route port ") and "bytes of messages queued" in d
    # NLM_F_REQUEST|NLM_F_DUMP: a dump of every link, in progress
    dumping = setup.replace('32, 18, 1, 1, 0)', '32, 18, 0x301, 1, 0)')
    assert dumping != setup
    with Target(tmp_path, dumping) as t:
        assert refusal(t.pid, 500).endswith(": a dump is in progress")


def test_other_netlink_packet_and_raw_refused_by_name(tmp_path):
    setup = """
import socket
a = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15)     # NETLINK_KOBJECT_UEVENT
p = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
os.dup2(a.fileno(), 500); os.dup2(p.fileno(), 501); os.dup2(r.fileno(), 502)
"""
    with Target(tmp_path, setup) as t:
        assert refusal(t.pid, 500) == "netlink kobject_uevent raw: only NETLINK_ROUTE sockets are restored"
        assert refusal(t.pid, 501) == "packet raw"
        assert refusal(t.pid, 502) == "inet raw protocol 1"


def test_route_port_id_taken_at_restore_refused(tmp_path):
    setup = """
import socket
n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0); n.bind((0, 0))
os.dup2(n.fileno(), 500); n.close()
"""
    with Target(tmp_path, setup, "report['port'] = socket.socket(fileno=os.dup(500)).getsockname()[0]") as t:
        port = t.check()["port"]
        img = dump(t.pid, [500], str(tmp_path / "img"))
        t.close()
        squatter = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        try:
            squatter.bind((port, 0))
            with pytest.raises(Refusal) as ei:
                restore(img)
            assert ei.value.reason == "socket" and f"port id {port} is taken here" in ei.value.detail
        finally:
            squatter.close()
