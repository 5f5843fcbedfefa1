"""One scenario, end to end: setup, workload, dump, between, restore, verify,
judge (DESIGN.md "One scenario, end to end").

The outcome is one of a closed set (DESIGN.md "Outcomes"): ``restored``,
``refused``, ``corrupted``, ``crashed``, ``hung``. :func:`run_scenario`
returns a :class:`Result`; :func:`judge` says whether it meets ``expect``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

from . import engines as engines_mod
from . import chaos, segment, statediff
from .errors import GuestLost, HarnessError, StepTimeout
from .targets import RunResult, Target

OUTCOMES = ("restored", "refused", "corrupted", "crashed", "hung")
# seconds, before the target's and the user's scale factors
# what a check may do to the world while the original is still to be restored
PHASES_READ_ONLY = ["inspect", "consume"]
#: how long an original let run by --leave-running has to exit once its
#: check is written (times the target's time scale)
ORIGINAL_EXIT_S = 10.0
#: a quiet workload's ticks before its quiet sleep (harness/memstate.py):
#: enough that a fresh start's counter (0) cannot pass for it
QUIET_TICKS = 2
DEFAULT_TIMEOUTS = {"setup": 60, "ready": 30, "dump": 120, "between": 60, "restore": 120, "verify": 30}

#: characters: an argument up to this long goes to the guest in a step's
#: argv (well under MAX_ARG_STRLEN, 128 KiB, for the targets that exec it)
INLINE_ARG_MAX = 64 << 10

#: where a workload to be restored on another guest starts its PIDs (above any
#: kernel thread a young guest makes; below the smallest pid_max, 32768)
MIGRATE_PID_FLOOR = 16384


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
    outside: List[Dict] = field(default_factory=list)   # the harness's own checks, from outside the process
    pid: Optional[int] = None
    timings: Dict[str, float] = field(default_factory=dict)
    diagnostics: str = ""
    #: how each engine command started: "warm" / "exec[: why]" (a guest's agent), "" elsewhere
    engine_start: List[str] = field(default_factory=list)
    #: how the workload started: "warm" (a fork of the guest's agent,
    #: harness/warmfork.py) or "exec[: why not warm]"
    workload_start: str = ""

    def failed_checks(self) -> List[Dict]:
        return [c for c in (self.verdict or {}).get("checks", []) + self.outside if not c.get("ok")]

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
    fd = r.get("fd")
    fd = ",".join(map(str, fd)) if isinstance(fd, list) else fd
    also = "".join(f",{x}" for x in r.get("also") or [])
    return "refused " + r["reason"] + also + (f" fd {fd}" if fd is not None else "") + f" at {r['at']}"


def outcome_text(res: Result) -> str:
    if res.outcome == "refused":
        reasons = sorted({r.get("reason", "?") + (f" fd {r['fd']}" if r.get("fd") is not None else "")
                          for r in res.refusals})
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
    if "also" in want:
        # A program's (workload.program): its fds are the program's own, not
        # the scenario's, so the refusal is the exact set of reason codes.
        got = {r.get("reason") for r in res.refusals}
        if got != {want["reason"], *want["also"]} or want.get("at") != res.at:
            return Judgement(not strict, f"expected {expected_text(expect)}, got {outcome_text(res)}: "
                             + "; ".join(r.get("message", "") for r in res.refusals))
        return Judgement(True, "")
    # Only the expected refusal satisfies it: same reason, same fd (none for a
    # process- or mapping-level one), same phase, and no other refusal besides.
    fds = want.get("fd")
    fds = set(fds) if isinstance(fds, list) else {fds}

    def matches(r: Dict) -> bool:
        return r.get("reason") == want["reason"] and r.get("fd") in fds
    if not res.refusals or not all(matches(r) for r in res.refusals) or want.get("at") != res.at \
            or fds - {r.get("fd") for r in res.refusals}:
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
        self.ready: Dict[str, Any] = {}
        self.ready_bytes = b""
        self.before: Dict[str, str] = {}
        #: the PID's state on the restore target before the restore when
        #: something else (not a workload) held it there (restore_on: other)
        self.taken: Optional[Dict[str, Any]] = None

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
                "witness": not (self.sc.get("dump") or {}).get("leave_running"),
                "quiet": QUIET_TICKS if wl.get("quiet") else 0,
                "ready_timeout": self.timeout("ready", t)}

    def cmd(self, t: Target, argv: List[str], step: str, timeout_step: Optional[str] = None) -> RunResult:
        t0 = time.monotonic()
        try:
            return t.run(argv, self.timeout(timeout_step or step, t), step=step)
        finally:
            self.res.timings[step] = round(self.res.timings.get(step, 0) + time.monotonic() - t0, 3)

    def _engine_cmd(self, t: Target, argv: List[str], step: str) -> RunResult:
        """An engine invocation; its own time is kept apart (``engine``): the
        part of a scenario's time no harness can save."""
        r = self.cmd(t, argv, step)
        self.res.timings["engine"] = round(self.res.timings.get("engine", 0) + r.duration, 3)
        self.res.engine_start.append(r.start)
        return r

    def _own(self, r: engines_mod.EngineResult) -> None:
        """The engine's own account of its work (``engine_own``): ``engine``
        minus it is start-up, exit and the channel to the guest."""
        if r.own_s is not None:
            self.res.timings["engine_own"] = round(self.res.timings.get("engine_own", 0) + r.own_s, 3)

    def need(self, r: RunResult, step: str, what: str) -> RunResult:
        if r.rc != 0:
            raise HarnessError(f"{what} failed (exit {r.rc})", step=step, detail=(r.stderr or r.stdout)[-3000:])
        return r

    def world(self, t: Target, phase: str, digest: Optional[str] = None, pid: Optional[int] = None,
              witness: bool = False) -> dict:
        """Run one phase of world steps on ``t``; optionally report the image's
        digest (after the steps), the state of ``pid`` (before them) and the
        witness's counter (:meth:`witness`, read in the same request)."""
        p = self.paths(t)
        argv = t.script("world.py") + ["apply", p["spec"], phase]
        if digest:
            argv += ["--digest", digest]
        if pid is not None:
            argv += ["--pid", str(pid)]
        name = (self.ready.get("proof") or {}).get("witness") if witness else None
        if name:
            argv += ["--witness", f"{p['ctldir']}/{name}"]
        r = self.need(self.cmd(t, argv, phase, "setup" if phase in ("setup", "before_dump") else "between"),
                      phase, f"{phase} steps")
        return _json_or_none(r.stdout) or {}

    def prepare(self, t: Target) -> None:
        p = self.paths(t)
        t0 = time.monotonic()
        try:    # the scenario's dir afresh and its spec in it (the control dir is the spec's)
            t.fresh_file(json.dumps(self.spec(t), indent=1).encode(), p["spec"], p["root"])
        finally:
            self.res.timings["setup"] = round(self.res.timings.get("setup", 0) + time.monotonic() - t0, 3)

    def workload(self, t: Target, pid: int, step: str, phases: Optional[List[str]] = None,
                 restored: bool = False) -> dict:
        """Snapshot ``pid`` from outside, then SIGUSR1 it and collect its
        verdict (and whether it lives). ``phases``: which checks it runs.
        ``restored``: first put the ready file back (a fresh start rewrites
        it) and read the restore's pidfile (``pidfile``), in the same
        request: two agent requests fewer."""
        p = self.paths(t)
        argv = t.script("workload.py") + ["signal", str(pid), p["verdict"], str(self.timeout("verify", t)),
                                          "--snap", json.dumps(self.ready.get("proof") or {})]
        if phases:
            argv += ["--phases", ",".join(phases)]
        if restored:
            ready = base64.b64encode(self.ready_bytes).decode()
            if len(ready) <= INLINE_ARG_MAX:
                argv += ["--ready", p["ready"], "--ready-b64", ready]
            else:
                t.put_bytes(self.ready_bytes, p["ready"])
            argv += ["--pidfile", p["pidfile"]]
        r = self.need(self.cmd(t, argv, step, "verify"), step, "signal the workload")
        return json.loads(r.stdout)

    def snapshot(self, t: Target, pid: int, step: str) -> Dict[str, str]:
        r = self.need(self.cmd(t, t.script("workload.py") + ["snap", str(pid), json.dumps(self.ready.get("proof") or {})],
                               step, "verify"), step, "snapshot the workload")
        return json.loads(r.stdout)

    def pidstate(self, t: Target, pid: int, step: str) -> dict:
        r = self.need(self.cmd(t, t.script("workload.py") + ["pidstate", str(pid)], step, "verify"),
                      step, "pid state")
        return json.loads(r.stdout)

    def witness(self, t: Target) -> Optional[int]:
        """The counter the original stored at its last tick before the freeze."""
        name = (self.ready.get("proof") or {}).get("witness")
        if not name:
            return None
        try:
            return int.from_bytes(t.get_bytes(f"{self.paths(t)['ctldir']}/{name}")[:8], "little")
        except Exception:
            return None

    # -- the scenario -------------------------------------------------------------
    def execute(self) -> Result:
        res = self.res
        chaos.scenario_begins()
        try:
            self.t.scenario_begins()
            self._execute()
        except StepTimeout as e:
            res.outcome, res.step, res.detail = "hung", e.step or "", e.message
        except GuestLost as e:
            res.outcome, res.step, res.detail = ("hung" if e.hung else "crashed"), e.step or res.step, e.message
        except HarnessError as e:
            # A step that failed because the guest broke under it (out of
            # disk, its channel gone) is the guest's crash, not the scenario's
            # error: report it so, and the worker gets a fresh guest.
            why = [w for w in (getattr(x, "health", lambda: "")() for x in self.used) if w]
            if not why:
                raise
            res.outcome, res.step = "crashed", e.step or res.step
            res.detail = f"{why[0]}; the step failed: {e.message}"
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
        if sc.get("restore_on") == "other" and t.can_migrate:
            # The restore guest must have the dumped PIDs free. Both guests
            # start from one snapshot, so their PID counters are alike, and
            # the restore guest's kernel threads (kworkers come and go) take
            # the next low PIDs: start this workload far above them.
            t0 = time.monotonic()
            try:    # a write by the agent itself (an exec'd sh was ~0.1 s under TCG)
                t.put_bytes(f"{MIGRATE_PID_FLOOR}\n".encode(), "/proc/sys/kernel/ns_last_pid")
            except HarnessError as e:
                raise HarnessError(f"move the PID counter failed: {e.message}", step="ready") from None
            finally:
                self.res.timings["ready"] = round(self.res.timings.get("ready", 0) + time.monotonic() - t0, 3)
        seg = sc.get("segment")
        if seg and t.can_migrate:
            # the service address and the staying client's, on the shared NIC (harness/segment.py)
            self.need(self.cmd(t, segment.up([seg["stays"], seg["moves"]]), "ready", "setup"), "ready",
                      "bring up the segment NIC")
        # setup steps, the workload's start and the before_dump steps: one command
        # The workload forked warm (harness/warmfork.py) unless CRUCIBLE_WARM_WORKLOAD=0: a
        # new python3 for it then (its start ~0.35 s slower under TCG, its image ~0.2 MB smaller)
        cold = ["--exec"] if os.environ.get("CRUCIBLE_WARM_WORKLOAD", "1") == "0" else []
        r = self.cmd(t, t.script("workload.py") + ["spawn", p["spec"], "--setup", "--before-dump", "--ready-file",
                                                   "--snap"] + cold, "ready", "setup")
        ready = _json_or_none(r.stdout) or {}
        ready_file = ready.pop("ready_file", None)
        snap = ready.pop("snap", None)
        res.workload_start = str(ready.get("start", "")) + (f": {ready['cold_why']}" if ready.get("cold_why") else "")
        if ready.get("pid"):
            self.pids.append(int(ready["pid"]))
        self.pids += ready.get("helpers", [])
        if r.rc != 0 or "error" in ready:
            raise HarnessError("the workload did not start", step=ready.get("step", "ready"),
                               detail=ready.get("error") or r.stderr[-3000:])
        # The harness keeps its own copy: a process that rewrites ready.json
        # (a fresh start does) cannot move the goalposts: the bytes spawn read
        # and sent on its line (a get of the file was one more agent request).
        self.ready = ready
        self.ready_bytes = ready_file.encode("latin-1") if isinstance(ready_file, str) else t.get_bytes(p["ready"])
        pid = int(ready["pid"])
        res.pid = pid
        # the snapshot before the dump came with the ready line (spawn --snap)
        self.before = snap if isinstance(snap, dict) else self.snapshot(t, pid, "dump")

        opts = sc.get("dump") or {}
        d = self._dump(t, pid, opts)
        if d is None:
            return None
        if d.status == "refused":
            return self._refused_at_dump(t, pid, d)
        if opts.get("leave_running"):
            # The original must go on exactly as before (it checks itself without
            # the phase that writes to the world), and the image must restore.
            self._verify(t, pid, "verify-original", PHASES_READ_ONLY)
            if res.outcome != "restored":
                res.detail = "after a --leave-running dump the original: " + res.detail
                return None
            # Its check done, the original exits: give it the time to (the
            # look below still fails one that goes on running); its verdict
            # goes first (the restored process writes its own there).
            self.need(self.cmd(t, t.script("workload.py") + ["pidstate", str(pid), "--gone-within",
                                                             str(ORIGINAL_EXIT_S * t.time_scale),
                                                             "--unlink", p["verdict"]],
                               "verify-original", "verify"), "verify-original", "reset verdict, original exit")
            lower = int(self.before.get("proof.counter") or 0)
        else:
            lower = None
        # every member: a zombie of the tree still holding its PID makes a
        # same-PID restore fail (criu: "Can't fork ... File exists")
        t.settle([pid] + self._member_pids())
        migrate = sc.get("restore_on") == "other"
        if migrate:
            st = self.pidstate(t, pid, "dump")
            if lower is None:
                lower = self.witness(t)
            if seg:
                # the address leaves the dump guest, the staying client's
                # segments to it held there until the restore (harness/segment.py)
                self.need(self.cmd(t, segment.hold(getattr(t, "python", "python3"), seg["stays"], seg["moves"]),
                                   "migrate", "between"), "migrate", "hold the client's segments")
                self.need(self.cmd(t, segment.drop(seg["moves"]), "migrate", "between"), "migrate",
                          "take the service address off the dump guest")
            rt = self._migrate(t)
            if seg:
                self.need(self.cmd(rt, segment.up([seg["moves"]]), "migrate", "between"), "migrate",
                          "put the service address on the restore guest")
            # whether the PID is free there: another guest's kernel threads
            # and services took PIDs of their own (a Debian 13 guest's
            # kworkers reach the 290s a workload gets on Debian 12)
            w = self.world(rt, "between", digest=self.paths(rt)["img"], pid=pid)
            self.taken = w["pid"] if w["pid"]["exists"] and not w["pid"]["workload"] else None
        else:
            rt = t
            w = self.world(rt, "between", digest=self.paths(rt)["img"], pid=pid, witness=lower is None)
            st = w["pid"]
            if lower is None:
                lower = w.get("witness")
        if st["exists"]:
            self.pids.append(pid)
            return self._crashed("dump", f"the original (pid {pid}) still runs after the dump "
                                         + ("and its check" if opts.get("leave_running") else "without --leave-running"))
        rp = self.paths(rt)
        digest = w.get("digest")
        res.step = "restore"
        rr = self.engine.parse(self._engine_cmd(rt, self.engine.restore_argv(rt, rp["img"], rp["pidfile"]), "restore"),
                               rt, rp["img"])
        res.engine_stderr = (res.engine_stderr + "\n" + rr.stderr).strip()
        self._own(rr)
        if rr.contract:
            return self._crashed("restore", "broke the CLI contract: " + "; ".join(rr.contract))
        if rr.status == "failed":
            return self._crashed("restore", f"exit {rr.rc}: {rr.message}")
        if rr.status == "refused":
            return self._refused_at_restore(rt, pid, rr, digest)
        self.pids.append(pid)
        if migrate and seg:
            # As a migration tool would once the address has moved: lift the
            # dump's network lock and the hold on the dump guest, so the
            # staying client's segments leave it for the restore guest.
            self.need(self.cmd(t, segment.unlock(getattr(t, "python", "python3")), "restore", "verify"),
                      "restore", "lift the dump guest's network lock")
        self._verify(rt, pid, "verify", None, lower=lower, migrate=migrate, restored=rr)

    def _crashed(self, step: str, detail: str) -> None:
        self.res.outcome, self.res.step, self.res.detail = "crashed", step, detail

    def _verify(self, t: Target, pid: int, step: str, phases: Optional[List[str]], note: str = "",
                lower: Optional[int] = None, migrate: bool = False,
                restored: Optional[engines_mod.EngineResult] = None) -> None:
        """Have ``pid`` check itself, after the harness's own look from outside:
        the state diff against the snapshot before the dump, and the proof
        that it is the dumped process (its secret, its counter). ``restored``:
        the restore's result; the PID it and the pidfile name are checked too."""
        res = self.res
        res.step = step
        w = self.workload(t, pid, step, phases, restored=restored is not None)
        if restored is not None:
            # Proof of continuation, part 1: the dumped PID, whatever the engine says.
            for what, got in (("the engine reported", restored.pid), ("the pidfile holds", _int(w.get("pidfile")))):
                if got is not None and got != pid:
                    self.pids.append(got)
                    res.outside.append({"fd": None, "what": f"proof: pid ({what})", "expected": pid, "got": got,
                                        "ok": False})
        snap = w.get("snap") or {}
        res.verdict = w.get("verdict")
        if not snap:
            res.outside.append({"fd": None, "what": "proof: the process exists", "expected": f"pid {pid}",
                                "got": f"no such process (state {w.get('state')})", "ok": False})
        else:
            res.outside += self._proof_checks(snap, lower)
            res.outside += statediff.as_checks(
                statediff.diff(self.before, snap, ({"migrate"} if migrate else set()) | {f"engine:{self.engine.name}"}),
                "state")
        if res.verdict is not None:
            res.outside += self._verdict_proof(res.verdict, snap)
        bad_outside = [c for c in res.outside if not c.get("ok")]
        if any(c["what"].startswith("proof:") for c in bad_outside):
            # the engine said it restored the process, and it is not that process
            res.outcome = "corrupted"
            res.detail = "not the dumped process: " + _checks_text(bad_outside)
        elif res.verdict is None:
            if w.get("exists"):
                res.outcome, res.detail = "hung", f"pid {pid} runs but wrote no verdict in time"
            else:
                res.outcome, res.detail = "crashed", f"pid {pid} died before writing its verdict (state {w.get('state')})"
            if bad_outside:
                res.detail += "\n" + _checks_text(bad_outside)
        elif res.verdict.get("ok") and not bad_outside:
            res.outcome, res.detail = "restored", note
        else:
            res.outcome = "corrupted"
            res.detail = (res.verdict.get("error") or "") + _checks_text(res.failed_checks())

    def _proof_checks(self, snap: Dict[str, str], lower: Optional[int]) -> List[Dict]:
        pub = self.ready.get("proof") or {}
        secret = snap.get("proof.secret") or ""
        try:
            got = hashlib.sha256(bytes.fromhex(secret)).hexdigest()
        except ValueError:
            got = f"unreadable ({secret})"
        out = [{"fd": None, "what": "proof: the in-memory secret (sha256, read from outside)",
                "expected": pub.get("secret_sha256"), "got": got, "ok": got == pub.get("secret_sha256")}]
        counter = snap.get("proof.counter") or ""
        if lower is not None:
            ok = counter.isdigit() and int(counter) >= lower
            out.append({"fd": None, "what": "proof: the tick counter continues from its value at the dump",
                        "expected": f">= {lower}", "got": counter, "ok": ok})
        return out

    @staticmethod
    def _verdict_proof(verdict: Dict, snap: Dict[str, str]) -> List[Dict]:
        """The process presents the same secret it holds in memory, and its counter
        has not gone back since the harness looked."""
        pr = verdict.get("proof") or {}
        out = [{"fd": None, "what": "proof: the secret the process presents", "expected": snap.get("proof.secret"),
                "got": pr.get("secret"), "ok": bool(snap) and pr.get("secret") == snap.get("proof.secret")}]
        c = snap.get("proof.counter") or ""
        if c.isdigit():
            out.append({"fd": None, "what": "proof: the counter the process presents", "expected": f">= {c}",
                        "got": pr.get("counter"), "ok": isinstance(pr.get("counter"), int) and pr["counter"] >= int(c)})
        return out

    def _dump(self, t: Target, pid: int, opts: dict) -> Optional[engines_mod.EngineResult]:
        """The engine's dump of `pid`, parsed; None when the engine crashed
        (broke its CLI contract or failed): judged so already."""
        p = self.paths(t)
        if not self.engine.creates_dir:
            self.need(self.cmd(t, ["mkdir", "-p", p["img"]], "dump"), "dump", "make image dir")
        self.res.step = "dump"
        d = self.engine.parse(self._engine_cmd(t, self.engine.dump_argv(t, pid, p["img"], opts), "dump"), t, p["img"])
        self.res.engine_stderr = d.stderr
        self._own(d)
        if d.contract:
            self._crashed("dump", "broke the CLI contract: " + "; ".join(d.contract))
            return None
        if d.status == "failed":
            self._crashed("dump", f"exit {d.rc}: {d.message}")
            return None
        return d

    def _refusal_left_files(self, t: Target) -> bool:
        """A refused dump must write no image: True (judged crashed) if it did."""
        if not self.engine.creates_dir:
            return False
        p = self.paths(t)
        left = self.need(self.cmd(t, t.script("world.py") + ["exists", p["img"], p["img"] + ".partial"], "dump"),
                         "dump", "look for image files")
        if left.stdout.strip():
            self._crashed("dump", f"a refused dump left files behind: {left.stdout.strip()}")
            return True
        return False

    def _member_pids(self) -> List[int]:
        """The workload's children, as its ready file names them."""
        children = (self.ready.get("process") or {}).get("children") or []
        return [int(c["pid"]) for c in children if c.get("pid")]

    def _refused_at_dump(self, t: Target, pid: int, d: engines_mod.EngineResult) -> None:
        """A refused dump must leave the original undisturbed and write no image."""
        res = self.res
        res.at, res.refusals = "dump", d.refusals
        if self._refusal_left_files(t):
            return
        self._verify(t, pid, "verify-original", None, lower=int(self.before.get("proof.counter") or 0))
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
        if st["exists"] and self.taken is not None and not st["workload"]:
            # not left by the restore: it held the PID before the restore began
            res.detail = (f"pid {pid} was taken on the restore target before the restore "
                          f"(state {self.taken['state']}, not a workload)")
        elif st["exists"]:
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
        t0 = time.monotonic()
        dst = self.other_factory()     # its revert to the golden snapshot (its boot, the first time)
        self.res.timings["other_guest"] = round(time.monotonic() - t0, 3)
        self.used.append(dst)
        sp, dp = self.paths(src), self.paths(dst)
        # Another machine, not a twin: the engine tells a restore on the
        # dumping machine by its boot id (engine/context.py boot_id) and
        # checks files differently there; a guest cloned from the dump
        # guest's memory would share it and test the same-node path.
        t0 = time.monotonic()      # read by the agents (an exec'd cat was ~0.1 s each under TCG)
        ids = [x.get_bytes("/proc/sys/kernel/random/boot_id").decode().strip() for x in (src, dst)]
        self.res.timings["migrate"] = round(self.res.timings.get("migrate", 0) + time.monotonic() - t0, 3)
        if ids[0] == ids[1]:
            raise HarnessError(f"the restore guest {dst.name} has the dump guest's boot id ({ids[0]}): "
                               "not another machine", step="migrate")
        tar = f"{sp['root']}/img.tar"
        self.need(self.cmd(src, ["tar", "-C", sp["root"], "-cf", tar, "img"], "migrate", "between"),
                  "migrate", "pack the image")
        t0 = time.monotonic()
        blob = src.get_bytes(tar)
        self.prepare(dst)
        dst.put_bytes(blob, f"{dp['root']}/img.tar")
        dst.put_bytes(self.ready_bytes, dp["ready"])
        name = (self.ready.get("proof") or {}).get("witness")
        if name:    # the witness is a mapped file: the same bytes must be there
            dst.put_bytes(src.get_bytes(f"{sp['ctldir']}/{name}"), f"{dp['ctldir']}/{name}")
        self.res.timings["migrate"] = round(self.res.timings.get("migrate", 0) + time.monotonic() - t0, 3)
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
        return _int(t.get_bytes(path).decode())
    except Exception:
        return None


def _int(text: Optional[str]) -> Optional[int]:
    try:
        return int(str(text).strip()) if text is not None else None
    except ValueError:
        return None


def run_scenario(sc: dict, sid: str, engine: engines_mod.Engine, target: Target,
                 other: Optional[Callable[[], Target]] = None, scale: float = 1.0) -> Result:
    """Run one scenario; raises HarnessError when the harness itself cannot."""
    if "program" in (sc.get("workload") or {}):
        from .programrun import ProgramRun
        return ProgramRun(sc, sid, engine, target, other, scale).execute()
    return Run(sc, sid, engine, target, other, scale).execute()
