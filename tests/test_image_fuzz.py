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

import os

import pytest

from harness import imagefuzz

SEED = 13
CASES = int(os.environ.get("CKPT_FUZZ_CASES", "100"))


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
