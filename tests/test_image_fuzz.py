"""Mutated images against `ckpt restore` (harness/imagefuzz.py; the full
run is bench/fuzz_images.py, `make reliability`): a fast subset here.

Every case must be refused before any process is created (the test-only
process-creation hook never fires, nothing is left or reparented to this
subreaper), with the kind of reason its mutation calls for, no traceback,
and nothing written outside the paths given. The control - the same image
unmutated - must restore, and the judge must see it: proof that a mutation
the engine let through would be caught.
"""

from __future__ import annotations

import json
import os

import pytest

from harness import imagefuzz

SEED = 13
CASES = int(os.environ.get("CKPT_FUZZ_CASES", "60"))     # the tool runs 500 (make reliability)


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("restores as root")
    base = str(tmp_path_factory.mktemp("fuzz"))
    return base, {w: imagefuzz.seed_image(os.path.join(base, f"seed-{w}"), w) for w in imagefuzz.SEEDS}


@pytest.mark.parametrize("which", imagefuzz.SEEDS)
def test_the_judge_sees_a_restore_of_the_unmutated_image(seed, which):
    base, seeds = seed
    s = seeds[which]
    row = imagefuzz.run_case(s, base, SEED, 9999, kind="none")
    imagefuzz.cleanup_case(base, 9999)
    assert row["outcome"] == "restored", row
    assert row["created"] and s["pids"][0] in row["leftover"] and "out/pidfile" in row["written"]
    assert not row["ok"]


def test_mutated_images_are_all_refused_before_any_process(seed):
    base, seeds = seed
    rows = []
    for i in range(CASES):
        rows.append(imagefuzz.run_case(seeds[imagefuzz.seed_for(i)], base, SEED, i))
        imagefuzz.cleanup_case(base, i)
    summary = imagefuzz.summarize(rows, SEED)
    assert summary["failures"] == 0, summary["failed_cases"]
    assert summary["tracebacks"] == 0 and summary["processes_created"] == 0
    assert summary["files_written_outside"] == 0
    assert set(summary["by_kind"]) == set(imagefuzz.KINDS)          # every kind of damage was tried
    assert all(summary["by_seed_image"].values())                   # on both images


def test_cases_depend_only_on_seed_and_index(seed, tmp_path):
    base, seeds = seed
    s = seeds[imagefuzz.seed_for(8)]
    a = imagefuzz.run_case(s, str(tmp_path / "a"), SEED, 8)
    b = imagefuzz.run_case(s, str(tmp_path / "b"), SEED, 8)
    assert (a["kind"], a["mutation"], a["reasons"]) == (b["kind"], b["mutation"], b["reasons"])


# -- one regression test per class the fuzz found (each was restored, or refused only
#    once the process existed, before its fix) -----------------------------------------

def _fd(R, pred, name="fds.json"):
    return next(r for r in R[name] if pred(r))


def _xstate_short(img, outside, rng):
    p = os.path.join(img, "xstate.bin")
    with open(p, "r+b") as f:
        f.truncate(64)
    imagefuzz.reseal(img, json.load(open(os.path.join(img, imagefuzz.MANIFEST))), ["xstate.bin"])
    return "xstate.bin cut to 64 bytes, re-hashed"


def _tree_member(img):
    return next(m for m in json.load(open(os.path.join(img, "tree.json")))["members"]
                if m["dir"] and "zombie" not in m)


def _tree_live_as_zombie(img, outside, rng):
    p = os.path.join(img, "tree.json")
    T = json.load(open(p))
    next(m for m in T["members"] if m["dir"] and "zombie" not in m)["zombie"] = {"status": 0}
    with open(p, "w") as f:
        json.dump(T, f)
    imagefuzz.reseal(img, json.load(open(os.path.join(img, imagefuzz.MANIFEST))), ["tree.json"])
    return "a live member said to be a zombie"


def _tree_root_pgid(img, outside, rng):
    p = os.path.join(img, "tree.json")
    T = json.load(open(p))
    T["members"][0]["pgid"] += 7
    with open(p, "w") as f:
        json.dump(T, f)
    imagefuzz.reseal(img, json.load(open(os.path.join(img, imagefuzz.MANIFEST))), ["tree.json"])
    return "tree.json gives the root another group than its core.json"


def _tree_ofd_extra(img, outside, rng):
    name = _tree_member(img)["dir"] + "fds.json"
    return imagefuzz.edit_records(
        lambda R, _: _fd(R, lambda r: r.get("kind") == "pipe" and "ofd_of" in r, name).update(end="rwx"),
        files=(name,))(img, outside, rng) or "an ofd_of pipe record with its own end"


CLASSES = {
    # an out-of-range number a handler clamped or defaulted
    "eventfd-count": ("sink", imagefuzz.edit_records(
        lambda R, _: _fd(R, lambda r: r["kind"] == "eventfd").update(count=1 << 64)), "count"),
    "pipe-end": ("sink", imagefuzz.edit_records(
        lambda R, _: _fd(R, lambda r: r["kind"] == "pipe" and "dup_of" not in r).update(end="rwx")), "end"),
    # a field restore ignores: a dup's own kind, a session leader's pgid, ofd_of's extra fields
    "dup-kind": ("sink", imagefuzz.edit_records(
        lambda R, _: _fd(R, lambda r: "dup_of" in r).update(kind="pipe")), "shares the open file"),
    "leader-pgid": ("sink", imagefuzz.edit_records(
        lambda R, _: R["core.json"]["session"].update(pgid=R["core.json"]["pid"] + 1)), "session"),
    # group 0 (the kernel's) holds only processes of session 0 (engine/sessionids.py)
    "group-zero": ("sink", imagefuzz.edit_records(
        lambda R, _: R["core.json"]["session"].update(pgid=0)), "session"),
    "tree-ofd-extra": ("tree", _tree_ofd_extra, "shares another record's open file"),
    # what the kernel refuses while the new process is built
    "sigaction-sigkill": ("sink", imagefuzz.edit_records(
        lambda R, _: R["core.json"]["sigactions"].update({"9": [0, 0, 0, 0]})), "SIGKILL"),
    "xstate-size": ("sink", _xstate_short, "xstate.bin"),
    # records that do not account for the image's files
    "fds-emptied": ("sink", imagefuzz.edit_records(lambda R, _: R.update({"fds.json": []})), "no record uses"),
    "tree-live-zombie": ("tree", _tree_live_as_zombie, "is a zombie but its records"),
    "tree-root-pgid": ("tree", _tree_root_pgid, "its core.json says"),
}


@pytest.mark.parametrize("cls", sorted(CLASSES))
def test_each_class_the_fuzz_found_is_refused_before_any_process(seed, cls):
    base, seeds = seed
    which, mutator, detail = CLASSES[cls]
    index = 5000 + sorted(CLASSES).index(cls)
    row = imagefuzz.run_case(seeds[which], base, SEED, index, kind="semantic", mutator=mutator)
    imagefuzz.cleanup_case(base, index)
    assert row["ok"], row
    assert row["reasons"] == ["image-invalid"] and detail in row["stderr"], row
