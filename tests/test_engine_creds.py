"""Credentials carried over by a dump and restore (engine/creds.py), proven
from inside the restored process (tests/targets/creds.c reports its own
/proc/thread-self/status and audit files, leader and a second thread):
supplementary groups of a root process (lost before: it came back with
ckpt's), capabilities a daemon dropped (bounding, permitted, effective),
ambient ones, a user that kept capabilities over setuid, filesystem ids of
their own, an unset audit loginuid. And the refusal where the audit
session cannot come back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from engine import creds as creds_mod
from engine.check import creds_plan
from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import TARGETS, procs, wait_for  # noqa: F401


@pytest.fixture(scope="module")
def creds_bin(tmp_path_factory) -> str:
    exe = str(tmp_path_factory.mktemp("creds-bin") / "creds")
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", exe, os.path.join(TARGETS, "creds.c")], check=True,
                   capture_output=True)
    return exe


def _lines(out: str):
    try:
        with open(out) as f:
            return [line.rstrip("\n") for line in f]
    except FileNotFoundError:
        return []


def start(procs, exe, out, *words) -> subprocess.Popen:
    err = out + ".err"
    with open(err, "w") as ef:
        p = subprocess.Popen([exe, out, *words], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=ef, close_fds=True, start_new_session=True)
    procs.popens.append(p)
    wait_for(lambda: "ready" in _lines(out) or p.poll() is not None, what="the creds target to start")
    assert p.poll() is None, open(err).read()
    return p


def report(pid: int, out: str) -> list:
    n = _lines(out).count("done")
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: _lines(out).count("done") > n, what="a report")
    lines = _lines(out)
    last = len(lines) - 1
    first = max(i for i in range(last) if lines[i] == "done" or lines[i] == "ready") + 1
    return lines[first:last]


def dump_restore(p, image: str, procs) -> None:
    dump(p.pid, image, Options())
    p.wait()
    restore(image, Options())
    procs.adopt(p.pid)


def _capset(line: str, name: str) -> int:
    return int(line.split(f"{name}: ")[1][:16], 16)


def _bit(name, bit, on):
    return lambda line: bool(_capset(line, name) >> bit & 1) == on


MODULE, NET_RAW, NICE, BIND = 16, 13, 23, 10
DROPPED = [_bit("CapBnd", MODULE, False), _bit("CapPrm", NET_RAW, False), _bit("CapEff", NICE, False),
           _bit("CapPrm", NICE, True)]
CASES = {
    "groups": (("groups",), ["4242 4343"]),
    "capdrop": (("capdrop",), DROPPED),
    "ambient": (("capdrop", "ambient"), DROPPED + [_bit("CapAmb", BIND, True), _bit("CapInh", BIND, True)]),
    "user": (("groups", "capdrop", "user", "fsuid", "thread"),
             ["Uid: 1000 1001 1002 3000", "Gid: 2000 2001 2002 4000"] + DROPPED[:2] + [_bit("CapEff", NICE, True)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_credentials_come_back_as_the_process_had_them(procs, creds_bin, tmp_path, case):
    words, expect = CASES[case]
    out = str(tmp_path / "out.txt")
    p = start(procs, creds_bin, out, *words)
    before = report(p.pid, out)
    assert len(before) == (2 if "thread" in words else 1), before
    for want in expect:     # what the process set, so the comparison proves something
        assert all(want(line) if callable(want) else want in line for line in before), (want, before)
    dump_restore(p, str(tmp_path / "img"), procs)
    after = report(p.pid, out)
    assert after == before


def test_unset_loginuid_comes_back_unset_from_a_logged_in_ckpt(procs, creds_bin, tmp_path):
    """A daemon's loginuid is unset (init's children); a ckpt run from a
    login session has one. The restore writes it unset again (a clone had
    ckpt's loginuid and session id before). ckpt's restore runs in a child
    that first logs itself in as 5."""
    if creds_mod.audit_of() is None:
        pytest.skip("no audit support in this kernel")
    if creds_mod.audit_of() != [creds_mod.UNSET, creds_mod.UNSET]:
        pytest.skip("this test runs ckpt's dump with an unset loginuid")
    out = str(tmp_path / "out.txt")
    p = start(procs, creds_bin, out, "groups", "thread")
    before = report(p.pid, out)
    assert all("luid=4294967295 | ses=4294967295" in line for line in before), before
    image = str(tmp_path / "img")
    dump(p.pid, image, Options())
    p.wait()
    here = os.path.dirname(TARGETS)
    code = ("import sys; open('/proc/self/loginuid', 'w').write('5'); "
            "from engine.restore import restore; from engine.context import Options; "
            f"restore({image!r}, Options())")
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(here), capture_output=True, text=True,
                       close_fds=True, timeout=120, env=dict(os.environ, PYTHONPATH=os.path.dirname(here)))
    assert r.returncode == 0, r.stderr
    procs.adopt(p.pid)
    after = report(p.pid, out)
    assert after == before


def test_another_audit_session_is_refused_at_dump(procs, creds_bin, tmp_path):
    """A process logged in as 5 (its own session id, handed out by the
    kernel) while ckpt's loginuid is another: that session id could never
    come back, so the dump refuses while the process is unharmed."""
    if creds_mod.audit_of() is None:
        pytest.skip("no audit support in this kernel")
    out = str(tmp_path / "out.txt")
    p = start(procs, creds_bin, out, "login5")
    assert creds_mod.audit_of(str(p.pid))[0] == 5
    with pytest.raises((Refusal, Refusals)) as e:
        dump(p.pid, str(tmp_path / "img"), Options())
    assert "audit login session" in str(e.value) and "unsupported-state" in str(e.value)
    assert p.poll() is None and not os.path.exists(str(tmp_path / "img"))


def test_plan_units():
    full = "000001ffffffffff"
    caps0 = {"CapInh": "0" * 16, "CapPrm": "0" * 16, "CapEff": "0" * 16, "CapBnd": full, "CapAmb": "0" * 16}
    root = {"uid": [0] * 4, "gid": [0] * 4, "groups": [], "caps": dict(caps0, CapPrm=full, CapEff=full)}
    assert creds_plan(root, root) == "same"
    assert creds_plan(dict(root, groups=[5]), root) == "set"
    assert creds_plan(dict(root, caps=dict(root["caps"], CapBnd="000001fffffeffff")), root) == "set"
    user = {"uid": [1000] * 4, "gid": [1000] * 4, "groups": [1000], "caps": caps0}
    assert creds_plan(user, root) == "setid"
    assert creds_plan(dict(root, uid=[1000, 0, 0, 0]), root) == "set"        # only the real uid: dumpable kept
    amb = dict(user, caps=dict(caps0, CapAmb="0000000000000400"))
    with pytest.raises(Refusal) as e:       # ambient outside permitted & inheritable: no process holds that
        creds_plan(amb, root)
    assert e.value.reason == "image-invalid"
    weak = dict(root, caps=dict(caps0, CapPrm="00000000000000c0", CapEff="00000000000000c0"))
    with pytest.raises(Refusal) as e:       # ckpt without CAP_SETPCAP
        creds_plan(root, weak)
    assert e.value.reason == "capability"
