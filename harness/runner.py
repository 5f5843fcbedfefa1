"""One scenario, end to end: setup, workload, dump, between, restore, verify,
judge (DESIGN.md "One scenario, end to end").

The outcome is one of a closed set (DESIGN.md "Outcomes"): ``restored``,
``refused``, ``corrupted``, ``crashed``, ``hung``. :func:`run_scenario`
returns a :class:`Result`; :func:`judge` says whether it meets ``expect``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

from . import engines as engines_mod
from .errors import HarnessError, StepTimeout
from .targets import RunResult, Target

OUTCOMES = ("restored", "refused", "corrupted", "crashed", "hung")
# seconds, before the target's and the user's scale factors
DEFAULT_TIMEOUTS = {"setup": 60, "ready": 30, "dump": 120, "between": 60, "restore": 120, "verify": 30}


@dataclass
class Result:
    """What happened; ``step`` is where the outcome was decided."""

    scenario: str
    engine: str
    outcome: str = "crashed"
    step: str = ""
    at: Optional[str] = None             # dump | restore, for refusals
    refusals: List[Dict] = field(default_factory=list)
    detail: str = ""
    engine_stderr: str = ""
    verdict: Optional[Dict] = None
    pid: Optional[int] = None
    timings: Dict[str, float] = field(default_factory=dict)
    diagnostics: str = ""

    def failed_checks(self) -> List[Dict]:
        return [c for c in (self.verdict or {}).get("checks", []) if not c.get("ok")]

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["failed_checks"] = self.failed_checks()
        d.pop("verdict")
        return d


@dataclass
class Judgement:
    passed: bool
    note: str


def expected_text(expect: dict) -> str:
    if expect.get("restored"):
        return "restored"
    r = expect["refused"]
    return "refused " + r["reason"] + (f" fd {r['fd']}" if "fd" in r else "") + (f" at {r['at']}" if "at" in r else "")


def outcome_text(res: Result) -> str:
    if res.outcome == "refused":
        reasons = sorted({r.get("reason", "?") for r in res.refusals})
        return f"refused {','.join(reasons)}" + (f" at {res.at}" if res.at else "")
    return res.outcome


def judge(expect: dict, res: Result, strict: bool = True) -> Judgement:
    """Does ``res`` meet ``expect``? Corruption never does, for any engine;
    for a non-strict engine (criu) other differences are noted, not failed."""
    if res.outcome == "corrupted":
        return Judgement(False, "silent corruption: " + _checks_text(res.failed_checks(), 3))
    if res.outcome in ("crashed", "hung"):
        return Judgement(not strict, f"{res.outcome} at {res.step}: {res.detail}".strip())
    if expect.get("restored"):
        ok = res.outcome == "restored"
        return Judgement(ok or not strict, "" if ok else f"expected restored, got {outcome_text(res)}")
    want = expect["refused"]
    if res.outcome != "refused":
        return Judgement(not strict, f"expected a refusal ({want['reason']}), but the engine restored it "
                                     "and the workload verified every fd")
    hit = [r for r in res.refusals if r.get("reason") == want["reason"]
           and ("fd" not in want or r.get("fd") == want["fd"])]
    if not hit or ("at" in want and want["at"] != res.at):
        return Judgement(not strict, f"expected {expected_text(expect)}, got {outcome_text(res)}: "
                         + "; ".join(r.get("message", "") for r in res.refusals))
    return Judgement(True, "")


def _checks_text(checks: List[Dict], limit: int = 20) -> str:
    lines = [f"fd {c.get('fd')}: {c.get('what')}: expected {c.get('expected')!r}, got {c.get('got')!r}"
             for c in checks[:limit]]
    if len(checks) > limit:
        lines.append(f"... and {len(checks) - limit} more")
    return "; ".join(lines) if limit <= 3 else "\n".join(lines)


class Run:
    """The state of one scenario run on one (or two) targets."""

    def __init__(self, sc: dict, sid: str, engine: engines_mod.Engine, target: Target,
                 other: Optional[Callable[[], Target]] = None, scale: float = 1.0):
        self.sc, self.sid, self.engine, self.t = sc, sid, engine, target
        self.other_factory = other
        self.scale = scale
        self.res = Result(scenario=sid, engine=engine.name)
        self.pids: List[int] = []
        self.used: List[Target] = [target]

    # -- plumbing ---------------------------------------------------------------
    def timeout(self, step: str, t: Target) -> float:
        base = (self.sc.get("timeouts") or {}).get(step, DEFAULT_TIMEOUTS[step])
        return float(base) * self.scale * t.time_scale

    def paths(self, t: Target) -> Dict[str, str]:
        root = f"{t.base}/{self.sid}"
        return {"root": root, "workdir": f"{root}/w", "ctldir": f"{root}/c", "img": f"{root}/img",
                "spec": f"{root}/c/spec.json", "ready": f"{root}/c/ready.json",
                "verdict": f"{root}/c/verdict.json", "pidfile": f"{root}/c/restored.pid"}

    def spec(self, t: Target) -> Dict[str, Any]:
        p = self.paths(t)
        wl = self.sc["workload"]
        return {"id": self.sid, "workdir": p["workdir"], "ctldir": p["ctldir"], "ready": p["ready"],
                "verdict": p["verdict"], "setup": self.sc.get("setup") or [],
                "before_dump": self.sc.get("before_dump") or [], "between": self.sc.get("between") or [],
                "fds": wl.get("fds") or [], "mmaps": wl.get("mmaps") or [], "process": wl.get("process") or {},
                "ready_timeout": self.timeout("ready", t)}

    def cmd(self, t: Target, argv: List[str], step: str, timeout_step: Optional[str] = None) -> RunResult:
        t0 = time.monotonic()
        try:
            return t.run(argv, self.timeout(timeout_step or step, t), step=step)
        finally:
            self.res.timings[step] = round(self.res.timings.get(step, 0) + time.monotonic() - t0, 3)

    def need(self, r: RunResult, step: str, what: str) -> RunResult:
        if r.rc != 0:
            raise HarnessError(f"{what} failed (exit {r.rc})", step=step, detail=(r.stderr or r.stdout)[-3000:])
        return r

    def world(self, t: Target, phase: str, digest: Optional[str] = None, pid: Optional[int] = None) -> dict:
        """Run one phase of world steps on ``t``; optionally report the image's
        digest (after the steps) and the state of ``pid`` (before them)."""
        p = self.paths(t)
        argv = t.script("world.py") + ["apply", p["spec"], phase]
        if digest:
            argv += ["--digest", digest]
        if pid is not None:
            argv += ["--pid", str(pid)]
        r = self.need(self.cmd(t, argv, phase, "setup" if phase in ("setup", "before_dump") else "between"),
                      phase, f"{phase} steps")
        return _json_or_none(r.stdout) or {}

    def prepare(self, t: Target) -> None:
        p = self.paths(t)
        self.need(self.cmd(t, ["rm", "-rf", p["root"]], "setup"), "setup", "clean work dir")
        self.need(self.cmd(t, ["mkdir", "-p", p["ctldir"]], "setup"), "setup", "make work dir")
        t.put_bytes(json.dumps(self.spec(t), indent=1).encode(), p["spec"])

    def workload(self, t: Target, pid: int, step: str) -> dict:
        """SIGUSR1 to ``pid`` and collect its verdict (and whether it lives)."""
        p = self.paths(t)
        r = self.need(self.cmd(t, t.script("workload.py") + ["signal", str(pid), p["verdict"],
                                                             str(self.timeout("verify", t))],
                               step, "verify"), step, "signal the workload")
        return json.loads(r.stdout)

    def pidstate(self, t: Target, pid: int, step: str) -> dict:
        r = self.need(self.cmd(t, t.script("workload.py") + ["pidstate", str(pid)], step, "verify"),
                      step, "pid state")
        return json.loads(r.stdout)

    # -- the scenario -------------------------------------------------------------
    def execute(self) -> Result:
        res = self.res
        try:
            self._execute()
        except StepTimeout as e:
            res.outcome, res.step, res.detail = "hung", e.step or "", e.message
        finally:
            for tgt in self.used:
                try:
                    tgt.cleanup(self.pids)
                except Exception as e:  # cleanup must not hide the outcome
                    res.detail += f"\n(cleanup on {tgt.name} failed: {e})"
        if res.outcome in ("crashed", "hung", "corrupted"):
            res.diagnostics = "\n".join(x.diagnostics() for x in self.used if x.diagnostics())
        return res

    def _execute(self) -> None:
        t, res, sc = self.t, self.res, self.sc
        p = self.paths(t)
        self.prepare(t)
        # setup steps, the workload's start and the before_dump steps: one command
        r = self.cmd(t, t.script("workload.py") + ["spawn", p["spec"], "--setup", "--before-dump"], "ready", "setup")
        ready = _json_or_none(r.stdout) or {}
        if ready.get("pid"):
            self.pids.append(int(ready["pid"]))
        self.pids += ready.get("helpers", [])
        if r.rc != 0 or "error" in ready:
            raise HarnessError("the workload did not start", step=ready.get("step", "ready"),
                               detail=ready.get("error") or r.stderr[-3000:])
        pid = int(ready["pid"])
        res.pid = pid

        opts = sc.get("dump") or {}
        if not self.engine.creates_dir:
            self.need(self.cmd(t, ["mkdir", "-p", p["img"]], "dump"), "dump", "make image dir")
        res.step = "dump"
        d = self.engine.parse(self.cmd(t, self.engine.dump_argv(t, pid, p["img"], opts), "dump"), t, p["img"])
        res.engine_stderr = d.stderr
        if d.contract:
            return self._crashed("dump", "broke the CLI contract: " + "; ".join(d.contract))
        if d.status == "failed":
            return self._crashed("dump", f"exit {d.rc}: {d.message}")
        if d.status == "refused":
            return self._refused_at_dump(t, pid, d)
        if opts.get("leave_running"):
            return self._verify(t, pid, "verify", "leave-running: the original checked itself after the dump")
        t.settle([pid])
        migrate = sc.get("restore_on") == "other"
        if migrate:
            st = self.pidstate(t, pid, "dump")
            rt = self._migrate(t)
            w = self.world(rt, "between", digest=self.paths(rt)["img"])
        else:
            rt = t
            w = self.world(rt, "between", digest=self.paths(rt)["img"], pid=pid)
            st = w["pid"]
        if st["exists"]:
            self.pids.append(pid)
            return self._crashed("dump", f"the original (pid {pid}) still runs after a dump without --leave-running")
        rp = self.paths(rt)
        digest = w.get("digest")
        res.step = "restore"
        rr = self.engine.parse(self.cmd(rt, self.engine.restore_argv(rt, rp["img"], rp["pidfile"]), "restore"),
                               rt, rp["img"])
        res.engine_stderr = (res.engine_stderr + "\n" + rr.stderr).strip()
        if rr.contract:
            return self._crashed("restore", "broke the CLI contract: " + "; ".join(rr.contract))
        if rr.status == "failed":
            return self._crashed("restore", f"exit {rr.rc}: {rr.message}")
        if rr.status == "refused":
            return self._refused_at_restore(rt, pid, rr, digest)
        new_pid = rr.pid or _pidfile(rt, rp["pidfile"]) or pid
        self.pids.append(new_pid)
        self._verify(rt, new_pid, "verify", "")

    def _crashed(self, step: str, detail: str) -> None:
        self.res.outcome, self.res.step, self.res.detail = "crashed", step, detail

    def _verify(self, t: Target, pid: int, step: str, note: str) -> None:
        res = self.res
        res.step = step
        w = self.workload(t, pid, step)
        res.verdict = w.get("verdict")
        if res.verdict is None:
            if w.get("exists"):
                res.outcome, res.detail = "hung", f"pid {pid} runs but wrote no verdict in time"
            else:
                res.outcome, res.detail = "crashed", f"pid {pid} died before writing its verdict (state {w.get('state')})"
        elif res.verdict.get("ok"):
            res.outcome, res.detail = "restored", note
        else:
            res.outcome = "corrupted"
            res.detail = (res.verdict.get("error") or "") + _checks_text(res.failed_checks())

    def _refused_at_dump(self, t: Target, pid: int, d: engines_mod.EngineResult) -> None:
        """A refused dump must leave the original undisturbed and write no image."""
        res = self.res
        res.at, res.refusals = "dump", d.refusals
        if self.engine.creates_dir:
            p = self.paths(t)
            left = self.cmd(t, ["ls", "-d", p["img"], p["img"] + ".partial"], "dump")
            if left.stdout.strip():
                return self._crashed("dump", f"a refused dump left files behind: {left.stdout.strip()}")
        self._verify(t, pid, "verify-original", "")
        if res.outcome == "restored":           # the original passed its own check
            res.outcome = "refused"
        elif res.outcome == "corrupted":
            res.detail = "after a refused dump the original saw: " + res.detail

    def _refused_at_restore(self, t: Target, pid: int, rr: engines_mod.EngineResult, digest: Optional[dict]) -> None:
        """A refused restore must leave no process and the image untouched."""
        res = self.res
        res.at, res.refusals = "restore", rr.refusals
        t.settle([pid])
        st = self.pidstate(t, pid, "restore")
        if st["exists"]:
            self.pids.append(pid)
            return self._crashed("restore", f"a refused restore left pid {pid} running (state {st['state']})")
        if self.engine.creates_dir:
            r = self.cmd(t, t.script("world.py") + ["digest", self.paths(t)["img"]], "restore", "verify")
            if _json_or_none(r.stdout) != digest:
                return self._crashed("restore", "a refused restore changed the image")
        res.outcome = "refused"

    def _migrate(self, src: Target) -> Target:
        """Copy the image to a second target built from the same base image,
        recreate the world there from the same seeds, and restore there."""
        if self.other_factory is None or not src.can_migrate:
            raise HarnessError("restore_on: other needs a second guest (run in guests, not --target local)",
                               step="migrate")
        dst = self.other_factory()
        self.used.append(dst)
        sp, dp = self.paths(src), self.paths(dst)
        tar = f"{sp['root']}/img.tar"
        self.need(self.cmd(src, ["tar", "-C", sp["root"], "-cf", tar, "img"], "migrate", "between"),
                  "migrate", "pack the image")
        blob = src.get_bytes(tar)
        ready = src.get_bytes(sp["ready"])
        self.prepare(dst)
        dst.put_bytes(blob, f"{dp['root']}/img.tar")
        dst.put_bytes(ready, dp["ready"])
        self.need(self.cmd(dst, ["tar", "-C", dp["root"], "-xpf", f"{dp['root']}/img.tar"], "migrate", "between"),
                  "migrate", "unpack the image")
        self.world(dst, "setup")
        self.world(dst, "before_dump")
        return dst


def _json_or_none(text: str) -> Optional[Any]:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _pidfile(t: Target, path: str) -> Optional[int]:
    try:
        return int(t.get_bytes(path).decode().strip())
    except Exception:
        return None


def run_scenario(sc: dict, sid: str, engine: engines_mod.Engine, target: Target,
                 other: Optional[Callable[[], Target]] = None, scale: float = 1.0) -> Result:
    """Run one scenario; raises HarnessError when the harness itself cannot."""
    return Run(sc, sid, engine, target, other, scale).execute()
