"""tools/zdtm.py's reading of CRIU's static/Makefile and of a test's log:
what decides which tests run, how, and what counts as PASS."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import zdtm  # noqa: E402

MAKEFILE = """\
TST_NOFILE	:=				\\
		busyloop00			\\
		env00x				\\
#		jobctl00			\\

ifeq ($(ARCH),s390)
TST_NOFILE	+=	s390x_only
endif

TST_FILE	=				\\
		write_read00			\\

TST_DIR		=				\\
		cwd01				\\

TST		=				\\
		$(TST_NOFILE)			\\
		umask00				\\

umask00.pid:	umask00
	$(<D)/$(<F) --pidfile=$@ --outfile=$<.out --mask=0345
"""


def test_makefile_lists_and_rules(tmp_path):
    mk = tmp_path / "Makefile"
    mk.write_text(MAKEFILE)
    kinds = zdtm._lists(str(mk))
    assert kinds == {"busyloop00": "TST_NOFILE", "env00x": "TST_NOFILE", "write_read00": "TST_FILE",
                     "cwd01": "TST_DIR", "umask00": "TST"}      # commented and arch-conditional ones left out
    special = zdtm._special_args(str(mk))
    assert zdtm._args("umask00", "TST", special) == ["--pidfile=umask00.pid", "--outfile=umask00.out", "--mask=0345"]
    assert zdtm._args("write_read00", "TST_FILE", special) == [
        "--pidfile=write_read00.pid", "--outfile=write_read00.out", "--filename=write_read00.test"]
    assert zdtm._args("cwd01", "TST_DIR", special)[-1] == "--dirname=cwd01.test"


def test_skips_by_desc():
    assert zdtm._why_skipped({"flavor": "ns uns"}).startswith("not a host-flavour")
    assert zdtm._why_skipped({"flags": "suid noauto"}) == "marked noauto"
    assert zdtm._why_skipped({}) is None
    assert zdtm._why_skipped({"flavor": "h ns", "flags": "suid"}) is None
    here = os.uname().machine
    assert zdtm._why_skipped({"arch": f"s390x {here} ppc64"}) is None
    assert zdtm._why_skipped({"arch": "s390x"}) == "for s390x"
    assert "ZDTM_UID" in zdtm._env({}) and "ZDTM_UID" not in zdtm._env({"flags": "suid"})


def _verdict(tmp_path, text, pid=None):
    """_stop on a process that is already gone, its log as given."""
    import subprocess
    p = subprocess.Popen(["sleep", "30"])
    out = tmp_path / "t.out"
    out.write_text(text)
    try:
        return zdtm._stop(p.pid, str(out))
    finally:
        p.kill()
        p.wait()


def test_verdicts(tmp_path):
    assert _verdict(tmp_path, "21:04:09.276: 12037: PASS\n")[0] == "PASS"
    assert _verdict(tmp_path, "21:04:09.276: 12037: FAIL: groups.c:52: Nr groups changed\n")[0] == "FAIL"
    # a PASS line does not hide a FAIL elsewhere in the log
    assert _verdict(tmp_path, "1: 2: FAIL: x\n1: 2: PASS\n")[0] == "FAIL"
    assert _verdict(tmp_path, "1: 2: ERR: memfd04.c:48: execveat()\n")[0] == "lost"


def test_expectations_and_matching():
    busy = {"test": "t", "outcome": "refused", "reasons": ["socket"],
            "detail": "tcp listener 0.0.0.0:8884: address in use"}
    other = {"test": "u", "outcome": "refused", "reasons": ["socket"], "detail": "tcp closing"}
    passed = {"test": "v", "outcome": "pass"}
    failed = {"test": "w", "outcome": "FAIL", "detail": "FAIL: x"}
    assert zdtm.expectations([busy, other, passed, failed]) == {
        "t": "refused: socket (address in use)", "u": "refused: socket", "v": "pass"}
    assert zdtm.matches("pass", passed) and not zdtm.matches("pass", other) and not zdtm.matches("pass", failed)
    assert zdtm.matches("pass", busy)                      # the machine's port, not the engine
    assert zdtm.matches("refused: socket (address in use)", passed)
    assert not zdtm.matches("refused: socket", passed)     # an improvement is a change to write down
    assert not zdtm.matches("refused: socket", failed)
    # a bound datagram socket's queue with another test's datagrams charged beside
    charged = {"test": "w", "outcome": "refused", "reasons": ["socket"],
               "detail": "not all from one socket of the dump connected to it (2 unix datagram sockets of "
                         "this network namespace have messages charged to them)"}
    assert zdtm.matches("pass", charged) and zdtm.outcome_text(charged) == \
        "refused: socket (messages charged to them)"
    assert zdtm.matches("refused: socket (messages charged to them)", passed)
