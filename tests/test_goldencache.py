"""harness/goldencache.py: a prepared guest kept between runs (no QEMU
here: the guest is a stand-in whose overlay export writes a marker)."""

import json
from pathlib import Path

from harness import goldencache

FACTS = {"kernel": "6.1.0-test", "guest_python": "3.11", "warm": True, "warm_note": "", "digests_note": "",
         "digests_seeded": True}


class FakeGuest:
    def __init__(self, data=b"overlay", fail=False):
        self.data, self.fail = data, fail

    def serial_tail(self, lines=40):
        return "[    0.000000] Linux version 6.1.0-test\ncrucible-ready"

    def export_overlay(self, dest):
        Path(dest).write_bytes(self.data)
        if self.fail:
            raise OSError(28, "No space left on device")


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    for tree in goldencache.TREES:
        (repo / tree / "__pycache__").mkdir(parents=True)
        (repo / tree / "a.py").write_text(f"# {tree}\n")
        (repo / tree / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"bytecode")
    return repo


def test_the_key_follows_every_source_and_the_environment_not_bytecode(tmp_path):
    repo = _repo(tmp_path)
    k = goldencache.key("booted", repo, env={})
    assert goldencache.key("booted", repo, env={}) == k
    assert goldencache.key("booted-other", repo, env={}) != k
    (repo / "vm" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"other bytecode")
    assert goldencache.key("booted", repo, env={}) == k
    assert goldencache.key("booted", repo, env={"HOME": "/x"}) == k
    assert goldencache.key("booted", repo, env={"CRUCIBLE_WARM_CKPT": "0"}) != k
    assert goldencache.key("booted", repo, env={"CKPT_FAULT": "x"}) != k
    # the run's own token and report dir are not how a guest is prepared
    assert goldencache.key("booted", repo, env={"CRUCIBLE_LIFEGUARD": "run-1", "CRUCIBLE_REPORTS": "/r"}) == k
    for tree in goldencache.TREES:
        (repo / tree / "kinds").mkdir(exist_ok=True)
        (repo / tree / "kinds" / "new.py").write_text("x = 1\n")     # a new file, deeper down
        k2 = goldencache.key("booted", repo, env={})
        assert k2 != k, tree
        k = k2
        (repo / tree / "a.py").write_text("# changed\n")
        k2 = goldencache.key("booted", repo, env={})
        assert k2 != k, tree
        k = k2


def test_kept_found_replaced_and_pruned_and_a_broken_one_never_found(tmp_path):
    root = tmp_path / "golden"
    goldencache.store(FakeGuest(), root, "x86_64-6.1-abc-a", "k0", FACTS)     # dots in a slot
    assert goldencache.find(root, "x86_64-6.1-abc-a", "k0") is not None
    goldencache.drop(root, "x86_64-6.1-abc-a", "k0")
    assert not list(root.iterdir())
    assert goldencache.find(root, "slot-a", "k1") is None
    goldencache.store(FakeGuest(), root, "slot-a", "k1", FACTS)
    path, facts = goldencache.find(root, "slot-a", "k1")
    assert path.read_bytes() == b"overlay" and {f: facts[f] for f in goldencache.META_FIELDS} == FACTS
    assert facts["console"].endswith("crucible-ready")      # a loaded guest's report shows it
    assert goldencache.find(root, "slot-a", "k2") is None and goldencache.find(root, "slot-b", "k1") is None
    goldencache.store(FakeGuest(), root, "slot-b", "k1", FACTS)       # another slot: left alone below
    goldencache.store(FakeGuest(), root, "slot-a", "k2", FACTS)
    goldencache.store(FakeGuest(), root, "slot-a", "k3", FACTS)       # KEEP = 2: k1 goes
    assert goldencache.KEEP == 2
    assert sorted(p.name for p in root.iterdir()) == ["slot-a-k2.json", "slot-a-k2.qcow2", "slot-a-k3.json",
                                                      "slot-a-k3.qcow2", "slot-b-k1.json", "slot-b-k1.qcow2"]
    # an export that fails leaves nothing half kept (and the kept ones as they were)
    try:
        goldencache.store(FakeGuest(fail=True), root, "slot-a", "k4", FACTS)
    except OSError:
        pass
    else:
        raise AssertionError("the failed export was not reported")
    assert goldencache.find(root, "slot-a", "k4") is None and not list(root.glob(".*"))
    assert len(list(root.iterdir())) == 6
    # a meta file that is not this key's, is unreadable or lacks a fact: not found
    _, meta = goldencache.paths(root, "slot-a", "k3")
    meta.write_text(json.dumps({**FACTS, "key": "k2"}))
    assert goldencache.find(root, "slot-a", "k3") is None
    meta.write_text("{")
    assert goldencache.find(root, "slot-a", "k3") is None
    meta.write_text(json.dumps({"key": "k3", **{k: v for k, v in FACTS.items() if k != "warm"}}))
    assert goldencache.find(root, "slot-a", "k3") is None
    # no overlay, no golden
    goldencache.paths(root, "slot-a", "k2")[0].unlink()
    assert goldencache.find(root, "slot-a", "k2") is None
    goldencache.drop(root, "slot-b", "k1")
    assert goldencache.find(root, "slot-b", "k1") is None and not list(root.glob("slot-b-*"))
