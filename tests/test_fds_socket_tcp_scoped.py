"""A TCP connection over IPv6 link-local addresses (fe80::/10: an address
that names a host only together with its interface, the scope). The same
address is put on two interfaces, so a restore that lost the scope would
pick the wrong one or fail. ckpt carries the scope as the socket's bound
device (SO_BINDTODEVICE, which binding to a scoped address sets, restored
by name): the restored ends are bound to the same interface and the bytes
queued before the dump arrive, then new ones. Runs in a network namespace
of its own (unshare -n), with a veth pair made there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
out, go = sys.argv[1], sys.argv[1] + ".go"
open(out + ".ready", "w").close()
while not os.path.exists(go):
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

# Inside the namespace: the interfaces, the target, dump, restore, the verdict.
DRIVER = r'''
import json, os, subprocess, sys, time
work, repo = sys.argv[1], sys.argv[2]
def sh(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, close_fds=True)
sh("ip", "link", "set", "lo", "up")
if sh("ip", "link", "add", "cv0", "type", "veth", "peer", "name", "cv1").returncode:
    print(json.dumps({"skip": "no veth here"})); sys.exit(0)
for dev in ("cv0", "cv1"):
    sh("ip", "link", "set", dev, "up")
    r = sh("ip", "-6", "addr", "add", "fe80::1/64", "dev", dev, "nodad")
    if r.returncode:
        print(json.dumps({"skip": "no IPv6 link-local address: " + r.stderr.strip()})); sys.exit(0)
out = os.path.join(work, "verdict")
p = subprocess.Popen([sys.executable, os.path.join(work, "target.py"), out], close_fds=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
deadline = time.monotonic() + 30
while not os.path.exists(out + ".ready"):
    if p.poll() is not None or time.monotonic() > deadline:
        print(json.dumps({"error": "the target did not get ready"})); sys.exit(0)
    time.sleep(0.02)
ck = [sys.executable, "-S", "-c", "import sys; sys.path[0] = %r; import engine.__main__" % repo]
img = os.path.join(work, "img")
r = sh(*ck, "dump", "-t", str(p.pid), "-D", img)
p.wait()
res = {"dump": [r.returncode, r.stderr]}
r = sh(*ck, "restore", "-D", img, "--pidfile", os.path.join(work, "pid"))
res["restore"] = [r.returncode, r.stderr]
if r.returncode == 0:
    pid = int(open(os.path.join(work, "pid")).read())
    open(out + ".go", "w").close()
    while not os.path.exists(out) and time.monotonic() < deadline + 30:
        time.sleep(0.02)
    res["verdict"] = json.load(open(out)) if os.path.exists(out) else None
    os.kill(pid, 9)
print(json.dumps(res))
'''


@pytest.mark.timeout(120)
def test_link_local_connection_keeps_its_interface(tmp_path):
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip")
    (tmp_path / "target.py").write_text(textwrap.dedent(TARGET))
    (tmp_path / "driver.py").write_text(DRIVER)
    r = subprocess.run(["unshare", "-n", sys.executable, str(tmp_path / "driver.py"), str(tmp_path), REPO],
                       capture_output=True, text=True, timeout=110, close_fds=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    assert "error" not in res, res
    assert res["dump"][0] == 0, res["dump"]
    assert res["restore"][0] == 0, res["restore"]
    v = res["verdict"]
    assert v is not None, "the restored target did not report"
    assert v["got"] == "helloping", v
    assert v["devs"] == ["cv0", "cv0"], v
    assert v["scopes"] == [v["idx"]] * 3, v
