"""The harness hook for `ckpt survey` in a guest (vm/survey.py), with a fake
guest that runs the real `ckpt survey` here, on one process of ours (booting
QEMU is the nightly's job)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vm import cli
from vm.errors import VmError
from vm.ssh import RunResult
from vm.survey import GUEST_HTML, report_paths, summary_line, survey_guest

REPO = Path(__file__).resolve().parent.parent


class FakeGuest:
    """`run` executes the command on this host, `ckpt` being this checkout's
    engine, narrowed to `--pid` so only our own target is frozen; files
    the guest writes land under `root`."""

    name = "fake"
    accel = "none"

    def __init__(self, root: Path, pid: int):
        self.root, self.pid, self.commands = root, pid, []

    def _local(self, path: str) -> str:
        return str(self.root / path.lstrip("/"))

    def run(self, cmd, timeout=60, check=False, stdin=None):
        self.commands.append(list(cmd))
        assert cmd[:2] == ["ckpt", "survey"]
        args = [self._local(a) if a == GUEST_HTML else a for a in cmd[1:]]
        os.makedirs(os.path.dirname(self._local(GUEST_HTML)), exist_ok=True)
        p = subprocess.run([sys.executable, "-m", "engine"] + args + ["--pid", str(self.pid)],
                           cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                           text=True, timeout=timeout, close_fds=True)
        return RunResult(p.returncode, p.stdout, p.stderr, 0.0)

    def get_bytes(self, path, timeout=120):
        return Path(self._local(path)).read_bytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="ckpt survey needs root")
def test_survey_guest_writes_json_and_html_reports(tmp_path):
    target = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd="/")
    try:
        g = FakeGuest(tmp_path / "guest", target.pid)
        out = tmp_path / "reports"
        res = survey_guest(g, out, "x86_64", "6.1", settle_s=0, timeout=60)
    finally:
        target.kill()
        target.wait(timeout=5)
    assert g.commands == [["ckpt", "survey", "--json", "--html", GUEST_HTML]]
    jpath, hpath = report_paths(out, "x86_64", "6.1")
    assert jpath.name == "survey-x86_64-6.1.json" and hpath.name == "survey-x86_64-6.1.html"
    assert report_paths(out, "x86_64", "6.12", "trixie")[0].name == "survey-x86_64-trixie-6.12.json"
    saved = json.loads(jpath.read_text())
    assert saved == res
    assert saved["guest"] == {"arch": "x86_64", "distro": "bookworm", "kernel": "6.1", "kernel_release": os.uname().release,
                              "accel": "none"}
    assert [r["pid"] for r in saved["records"]] == [target.pid]
    assert saved["summary"]["counts"] == {"restorable": 1}
    assert "<svg" in hpath.read_text()
    assert summary_line(saved).startswith("1 restorable, 0 refused")


def test_survey_guest_raises_on_a_failed_survey(tmp_path):
    class Broken:
        name = "broken"

        def run(self, cmd, timeout=60):
            return RunResult(4, "", "ckpt: failed: boom\n", 0.0)

    with pytest.raises(VmError) as e:
        survey_guest(Broken(), tmp_path, "aarch64", "backports", settle_s=0)
    assert e.value.kind == "command" and "boom" in str(e.value.stderr)
    assert not list(tmp_path.iterdir())


def test_vm_cli_has_survey_subcommand(monkeypatch, tmp_path):
    seen = {}

    def fake_run_survey(out_dir, arch, kernel, accel, engine_dir, settle_s, distro):
        seen.update(out=out_dir, arch=arch, kernel=kernel, accel=accel, engine=engine_dir, settle=settle_s,
                    distro=distro)
        return {"summary": {"counts": {"refused": 3}, "causes": [{"label": "threads", "processes": 3}]}}

    import vm.survey
    monkeypatch.setattr(vm.survey, "run_survey", fake_run_survey)
    rc = cli.main(["survey", "--arch", "aarch64", "--kernel", "backports", "--out", str(tmp_path), "--accel", "tcg"])
    assert rc == 0
    assert seen == {"out": tmp_path, "arch": "aarch64", "kernel": "backports", "accel": "tcg",
                    "engine": REPO / "engine", "settle": 2.0, "distro": "bookworm"}
    rc = cli.main(["survey", "--arch", "aarch64", "--distro", "trixie", "--out", str(tmp_path)])
    assert rc == 0 and (seen["distro"], seen["kernel"]) == ("trixie", "6.12")


def test_nightly_surveys_each_arch_kernel_and_keeps_the_reports():
    import yaml
    wf = yaml.safe_load((REPO / ".github" / "workflows" / "nightly.yml").read_text())
    steps = wf["jobs"]["corpus"]["steps"]
    names = [s.get("name", "") for s in steps]
    i = next(n for n, s in enumerate(steps) if "-m vm survey" in s.get("run", ""))
    step = steps[i]
    assert '--arch "${{ matrix.arch }}"' in step["run"] and '--kernel "${{ matrix.kernel }}"' in step["run"]
    assert "--out reports" in step["run"]
    assert "matrix.engine == 'ckpt'" in step["if"] and "always()" in step["if"]
    assert i > names.index("make vm-test")              # after the corpus: it must not slow its cells
    up = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact@")
              and s["with"]["name"].startswith("survey-"))
    assert "reports/survey-*.json" in up["with"]["path"] and "reports/survey-*.html" in up["with"]["path"]
    outcome = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact@")
                   and s["with"]["name"].startswith("outcome-"))
    assert "!reports/survey-*" in outcome["with"]["path"]   # the outcome merge reads only its own files
    # the command line the step runs is one vm/cli.py accepts
    args = cli.parser().parse_args(["survey", "--arch", "x86_64", "--kernel", "6.1", "--out", "reports"])
    assert args.func is cli.cmd_survey
