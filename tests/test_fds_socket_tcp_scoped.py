"""A TCP connection over IPv6 link-local addresses (fe80::/10: an address
that names a host only together with its interface, the scope). The same
address is put on two interfaces, so a restore that lost the scope would
pick the wrong one or fail. ckpt carries the scope as the socket's bound
device (SO_BINDTODEVICE, which binding to a scoped address sets, restored
by name): the restored ends are bound to the same interface and the bytes
queued before the dump arrive, then new ones. Runs in network and pid
namespaces of its own (pidns_support.in_pidns, unshare --net), with a
veth pair made there; everything in them dies with the script."""

from __future__ import annotations

import shutil

import pytest

from pidns_support import in_pidns, needs_unshare

TARGET = r'''
import json, os, socket, sys, time
SO_BINDTODEVICE = 25
idx = socket.if_nametoindex("cv0")
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.bind(("fe80::1", 0, 0, idx)); srv.listen(1)
c = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
c.connect(("fe80::1", srv.getsockname()[1], 0, idx))
a, _ = srv.accept()
srv.close()
c.sendall(b"hello")
time.sleep(0.1)
out = sys.argv[1]
open(out + ".ready", "w").close()
while not os.path.exists(out + ".go"):
    time.sleep(0.02)
c.sendall(b"ping")
got = b""
a.settimeout(10)
while len(got) < 9:
    b = a.recv(64)
    if not b:
        break
    got += b
dev = lambda s: s.getsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, 16).rstrip(b"\0").decode()
res = {"got": got.decode(), "scopes": [c.getsockname()[3], a.getsockname()[3], a.getpeername()[3]],
       "devs": [dev(c), dev(a)], "idx": idx}
with open(out + ".tmp", "w") as f:
    json.dump(res, f)
os.rename(out + ".tmp", out)
time.sleep(60)
'''

SCRIPT = r'''
def ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, close_fds=True)
ip("link", "set", "lo", "up")
if ip("link", "add", "cv0", "type", "veth", "peer", "name", "cv1").returncode:
    done({"skip": "no veth here"}); sys.exit(0)
for dev in ("cv0", "cv1"):
    ip("link", "set", dev, "up")
    r = ip("-6", "addr", "add", "fe80::1/64", "dev", dev, "nodad")
    if r.returncode:
        done({"skip": "no IPv6 link-local address: " + r.stderr.strip()}); sys.exit(0)
out = os.path.join(work, "verdict")
p = start([sys.executable, os.path.join(work, "target.py"), out])
wait_for(lambda: os.path.exists(out + ".ready") or p.poll() is not None, timeout=30, what="the target")
assert p.poll() is None, "the target died before it was ready"
res = {"dump": ckpt("dump", "-t", p.pid, "-D", os.path.join(work, "img"))}
p.wait()
res["restore"] = ckpt("restore", "-D", os.path.join(work, "img"))
if res["restore"][0] == 0:
    open(out + ".go", "w").close()
    wait_for(lambda: os.path.exists(out), timeout=30, what="the restored target's report")
    res["verdict"] = json.load(open(out))
done(res)
'''


@needs_unshare
@pytest.mark.skipif(not shutil.which("ip"), reason="needs ip(8)")
def test_link_local_connection_keeps_its_interface(tmp_path):
    (tmp_path / "target.py").write_text(TARGET)
    res = in_pidns(f"work = {str(tmp_path)!r}\n" + SCRIPT, extra=["--net"], timeout=110)
    if "skip" in res:
        pytest.skip(res["skip"])
    assert res["dump"][0] == 0, res["dump"]
    assert res["restore"][0] == 0, res["restore"]
    v = res["verdict"]
    assert v["got"] == "helloping", v
    assert v["devs"] == ["cv0", "cv0"], v
    assert v["scopes"] == [v["idx"]] * 3, v
