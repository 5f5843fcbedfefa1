"""One scenario whose workload is a real program (``workload.program``):
start it, dump it with its tree, restore it, and judge it by the
interaction the scenario declares (harness/program.py runs in the target).

The same outcomes and the same rules as :mod:`harness.runner`: a refused
dump leaves the original running and passing the ``after`` interaction,
and no image; a refused restore leaves no process and the image unchanged;
the restored program runs under the dumped PID with the tree it had, and
the state it held before the dump (a value stored in it, the tokens and
counters it printed) is what it answers with after. A fresh start of the
program (the ``restart`` mutants) has none of that state: it is judged
corrupted, never restored.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from typing import Any, Dict, List, Optional

from . import runner, statediff
from .errors import HarnessError
from .targets import Target

OUTPUT = "output"                 # program.OUTPUT, in the work dir
READY = "program-ready.json"      # the harness's own copy, in the control dir, for `after`


def missing_here(sc: dict, programs_dir: str) -> str:
    """Why a program scenario cannot run on this host ('' if it can): a
    command it starts or runs is not installed here (--target local; the
    guest image has them all)."""
    prog = sc["workload"]["program"]
    firsts = [prog["run"][0]] if "run" in prog else []
    for phase in ("before", "after"):
        firsts += [s["exec"]["argv"][0] for s in prog.get(phase) or [] if "argv" in s.get("exec", {})]
    for cmd in firsts:
        if "{programs}" in cmd and not programs_dir:
            return f"{cmd} needs CRUCIBLE_PROGRAMS_DIR (vm/programs built for this host)"
        path = cmd.replace("{programs}", programs_dir)
        if not (os.access(path, os.X_OK) if "/" in path else shutil.which(path)):
            return f"{path} is not installed on this host"
    return ""


class ProgramRun(runner.Run):
    """A :class:`runner.Run` of a program workload."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        #: what only this run knows: a restarted program cannot guess it
        self.token = secrets.token_hex(8)

    def spec(self, t: Target) -> Dict[str, Any]:
        out = super().spec(t)
        # the steps of one phase must end within the step's own timeout, with
        # room to report (a silent program is a failed check, not a hang)
        out.update(program=self.sc["workload"]["program"], token=self.token,
                   programs_dir=getattr(t, "programs_dir", ""),
                   steps_budget=round(self.timeout("verify", t) * 0.8, 1))
        return out

    def _execute(self) -> None:
        t, res = self.t, self.res
        p = self.paths(t)
        self.prepare(t)
        r = self.cmd(t, t.script("program.py") + ["spawn", p["spec"]], "ready", "setup")
        ready = runner._json_or_none(r.stdout) or {}
        if ready.get("pid"):
            self.pids.append(int(ready["pid"]))
        self.pids += ready.get("helpers", [])
        if r.rc != 0 or "error" in ready:
            raise HarnessError("the program did not start", step=ready.get("step", "ready"),
                               detail=ready.get("error") or r.stderr[-3000:])
        self.ready = ready          # kept here: the target's copy is rewritten before `after`
        pid = int(ready["pid"])
        res.pid = pid

        # a program on a terminal whose master is outside (tty: outside) is a shell job
        d = self._dump(t, pid, {"shell_job": True} if ready.get("tty") else {})
        if d is None:
            return None
        if d.status == "refused":
            res.at, res.refusals = "dump", d.refusals
            if self._refusal_left_files(t):
                return None
            # the original goes on as if nothing happened: the same interaction passes
            self._after(t, pid, "verify-original")
            if res.outcome == "restored":
                res.outcome = "refused"
            elif res.outcome == "corrupted":
                res.detail = "after a refused dump the original: " + res.detail
            return None
        t.settle([pid] + [int(m) for m in (ready.get("tree") or {}) if int(m) != pid])   # every member gone
        w = self.world(t, "between", digest=p["img"], pid=pid)
        if w["pid"]["exists"]:
            self.pids.append(pid)
            return self._crashed("dump", f"the original (pid {pid}) still runs after the dump")
        # Everything the original wrote, up to its last instant: what the
        # restored program writes must follow on from here.
        out = self.cmd(t, ["cat", f"{p['workdir']}/{OUTPUT}"], "between")
        self.ready.setdefault("vars", {}).setdefault("_marks", {})["dump"] = len(out.stdout)
        res.step = "restore"
        argv = self.engine.restore_argv(t, p["img"], p["pidfile"], ready.get("tty", ""))
        if ready.get("tty"):
            # a shell job is restored by its shell: the restore runs in the
            # session whose terminal it is (the keeper's), like `ckpt restore --tty`
            # typed at that shell
            argv = t.script("program.py") + ["insession", p["spec"], str(self.timeout("restore", t)), "--"] + \
                [str(a) for a in argv]
        rr = self.engine.parse(self._engine_cmd(t, argv, "restore"), t, p["img"])
        res.engine_stderr = (res.engine_stderr + "\n" + rr.stderr).strip()
        if rr.contract:
            return self._crashed("restore", "broke the CLI contract: " + "; ".join(rr.contract))
        if rr.status == "failed":
            return self._crashed("restore", f"exit {rr.rc}: {rr.message}")
        if rr.status == "refused":
            return self._refused_at_restore(t, pid, rr, w.get("digest"))
        self.pids.append(pid)
        for what, got in (("the engine reported", rr.pid), ("the pidfile holds", runner._pidfile(t, p["pidfile"]))):
            if got is not None and got != pid:
                self.pids.append(got)
                res.outside.append({"fd": None, "what": f"proof: pid ({what})", "expected": pid, "got": got,
                                    "ok": False})
        self._after(t, pid, "verify")

    def _after(self, t: Target, pid: int, step: str) -> None:
        """The outside checks and the `after` interaction, from the harness's
        own copy of what was seen before the dump."""
        res = self.res
        res.step = step
        p = self.paths(t)
        ready = f"{p['ctldir']}/{READY}"
        t.put_bytes(json.dumps(self.ready).encode(), ready)
        r = self.need(self.cmd(t, t.script("program.py") + ["after", p["spec"], ready], step, "verify"),
                      step, "the after steps")
        verdict: Optional[Dict[str, Any]] = runner._json_or_none(r.stdout)
        if not isinstance(verdict, dict):
            raise HarnessError("program.py after printed no verdict", step=step, detail=r.stdout[-2000:])
        res.verdict = verdict
        # everything /proc shows that a program does not change by itself,
        # per member, against the look right before the dump
        before, now = self.ready.get("snaps") or {}, verdict.pop("snaps", None) or {}
        for pid in sorted(set(before) & set(now), key=int):
            b, a = statediff.program_view(before[pid], now[pid])
            res.outside += statediff.as_checks(statediff.diff(b, a, {f"engine:{self.engine.name}"}),
                                               f"state of member {pid}")
        bad: List[Dict] = [c for c in verdict.get("checks", []) + res.outside if not c.get("ok")]
        if not bad:
            res.outcome, res.detail = "restored", ""
            return
        res.outcome = "corrupted"
        proof = any(c["what"].startswith("proof:") for c in bad)
        res.detail = ("not the dumped program: " if proof else "") + runner._checks_text(bad) \
            + "\n--- program output (tail) ---\n" + str(verdict.get("output_tail", ""))[-1200:]
