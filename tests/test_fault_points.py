"""A fault at every step of dump and restore (engine/faults.py), each run
once against the faultee target (tests/targets/faultee.py).

The points are not listed here: a traced dump and restore say which ones a
run passes, and the scan of the source for ``faults.point(`` says which
call sites exist; every call site must be passed, and every fd kind a dump
saves must show up in the per-kind families. Then each point fails once:
a dump must leave its target as it was (running, untraced, same masks, fds
and cwd, its own check of every fd, the secret and both counters going on)
and no complete-looking image; a restore must leave no process, the image
byte for byte, and restore afterwards.
"""

from __future__ import annotations

import json
import os

import pytest

from engine import faults
from engine.fds import KINDS
from fault_support import VARIANTS, reference, render_points, run_points
from engine_core_support import become_subreaper

pytestmark = pytest.mark.timeout(900)

# Kinds whose every fd is refused at dump (nothing reaches their dump()).
ALWAYS_REFUSED = {"pseudo", "fanotify"}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    become_subreaper()
    return reference(str(tmp_path_factory.mktemp("faultref")))


def test_every_call_site_is_reached(ref):
    sites = {site for site, _ in faults.call_sites()}
    assert len(sites) >= 50
    assert sites - ref["sites"] == set(), "fault points the reference dumps/restores never pass"


def test_every_fd_kind_has_points(ref):
    kinds = {k for k, mod in KINDS.items() if mod} - ALWAYS_REFUSED
    for family, trace in (("dump.fd", "dump"), ("restore.validate", "restore"), ("restore.fd", "restore")):
        ids = [fid for v in VARIANTS for fid in ref[(v + "_" if v else "") + trace]]
        have = {fid.split(".")[-1] for fid in ids if fid.startswith(family + ".")}
        assert kinds - have == set(), f"{family}: fd kinds without a point"


def test_every_point(ref, tmp_path):
    rows = run_points(ref, str(tmp_path))
    out = os.environ.get("CRUCIBLE_FAULT_TABLE")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    print(render_points(rows))
    bad = [r for r in rows if r["problems"]]
    assert len(rows) >= 80
    assert not bad, render_points(bad)
