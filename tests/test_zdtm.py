"""CRIU's own C/R tests (zdtm static, CRIU 4.1.1 as Debian ships it: make
setup fetches the source) against ckpt, through tools/zdtm.py: each test
sets up its state, ckpt dumps and restores it, and the test checks its
state and says PASS or FAIL.

Every test ends as tests/zdtm_expect.json says: restored and PASSing, or
refused with those reason codes (and then the target must still PASS:
a refusal that harmed it is a FAIL). Never a FAIL after a restore (a
silent corruption), a lost process or an error. An outcome that improves
(a refusal that now restores) fails too until the file is rewritten
(`python3 tools/zdtm.py -j 2 --expect-out tests/zdtm_expect.json`, after a
look at the change): what the expectations say must be what is true.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import zdtm  # noqa: E402

EXPECT = os.path.join(ROOT, "tests", "zdtm_expect.json")


@pytest.mark.timeout(1500)
def test_zdtm_static_tests_end_as_expected(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("ckpt runs as root")
    zdtm.fetch(zdtm.DEFAULT_SRC)         # a clear error if it cannot be fetched, never a skip
    with open(EXPECT) as f:
        expect = json.load(f)
    out = tmp_path / "zdtm.json"
    # A short path others can reach: tests not flagged suid run under
    # CRIU's test ids, and unix socket paths stop at 108 bytes.
    work = tempfile.mkdtemp(prefix="zdtm-", dir="/var/tmp")
    try:
        # In a mount namespace of its own: the tests mount (cgroup
        # hierarchies under their directories), and the host tier's other
        # tests, running beside, must not see it.
        r = subprocess.run(["unshare", "--mount", "--propagation", "private",
                            sys.executable, os.path.join(ROOT, "tools", "zdtm.py"), "--only", ",".join(sorted(expect)),
                            "--no-baseline", "-j", "2", "--work", work, "--out", str(out)],
                           capture_output=True, text=True, close_fds=True, timeout=1400)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert out.exists(), r.stderr[-3000:]
    results = {x["test"]: x for x in json.load(open(out))["results"]}
    wrong = []
    for name, want in sorted(expect.items()):
        got = results.get(name)
        text = zdtm.outcome_text(got) if got else "not run"
        if not got or not zdtm.matches(want, got):
            detail = (got or {}).get("detail", "")
            wrong.append(f"{name}: expected {want}, got {text} {detail[-300:]}")
    assert not wrong, "\n".join(wrong)
