"""The pytest plugin: every ``scenarios/**/*.yaml`` is a test, run in a guest.

One item per scenario file (per engine when ``--engine`` is given twice),
validated at collection (``file:line`` errors, nothing runs), tags as
markers, one guest per xdist worker booted once and reverted to a golden
snapshot between scenarios, a summary table and ``reports/scenarios.json``
at the end. See harness/ and DESIGN.md "The harness".
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from harness import cpuclock, engines, goldencache, lifeguard, runner, schema
from harness import report as report_mod
from harness.errors import HarnessError
from harness.targets import REPO, GuestTarget, LocalTarget, Target

REPORTS_DIR = Path(os.environ.get("CRUCIBLE_REPORTS", str(REPO / "reports")))


def pytest_addoption(parser):
    g = parser.getgroup("crucible", "Crucible scenario harness")
    g.addoption("--arch", default=os.environ.get("ARCH", "x86_64"), help="guest architecture (default x86_64)")
    g.addoption("--engine", action="append", type=_engine_option, default=None,
                help="engine to run scenarios against; give twice to compare (default ckpt); "
                     "mutant:NAME is ckpt with one thing broken (harness/mutants.py), mutant:all every mutant")
    g.addoption("--accel", default="auto", help="QEMU accelerator: auto | kvm | tcg")
    g.addoption("--distro", default=None,
                help="guest distro (a key of vm.recipe.DISTROS: bookworm or trixie; default bookworm)")
    g.addoption("--kernel", default=None,
                help="guest kernel (one of the distro's in vm.recipe.DISTROS, e.g. 6.1 or backports for "
                     "bookworm, 6.12 for trixie; default: the distro's own)")
    g.addoption("--keep-guest", action="store_true", help="leave the guest up after a failure, print how to SSH in")
    g.addoption("--guest-timeout-scale", type=float, default=1.0, help="multiply every step timeout (slow TCG)")
    g.addoption("--target", choices=("guest", "local"), default="guest",
                help="run scenarios in QEMU guests (default) or on this host (development)")
    g.addoption("--generate", type=int, default=0, metavar="N",
                help="run N generated scenarios (harness/generate.py) instead of the YAML files")
    g.addoption("--seed", type=int, default=1, help="seed of --generate (the same seed gives the same cases)")
    g.addoption("--shrink-budget", type=int, default=30, metavar="RUNS",
                help="runs spent shrinking a failing generated case (0: do not shrink)")
    g.addoption("--found-dir", default=str(REPO / "scenarios" / "found"),
                help="where shrunk failing generated cases are written (default scenarios/found)")


def pytest_configure(config):
    for tag, text in schema.TAGS.items():
        config.addinivalue_line("markers", f"{tag}: scenario tag: {text}")
    config.addinivalue_line("markers", "scenario: a YAML scenario (scenarios/**/*.yaml)")
    config.addinivalue_line("markers", "guest: needs a real QEMU guest (boots one)")
    for e in engines.ENGINES:
        config.addinivalue_line("markers", f"engine_{e}: scenario run against {e}")
    config.addinivalue_line("markers", "engine_mutant: scenario run against a mutant engine (mutant:NAME)")
    config._crucible = Crucible(config)
    if not config.getoption("keep_guest", False):
        lifeguard.guard()     # what this run starts dies with it, even if it is killed


def _engine_option(text: str) -> str:
    """--engine's value: ckpt, criu, mutant:NAME or mutant:all."""
    if text == engines.MUTANT_PREFIX + "all":
        return text
    try:
        engines.make(text)
    except KeyError as e:
        raise ValueError(str(e)) from None
    return text


def engine_names(config) -> List[str]:
    """The --engine values, mutant:all expanded, each once, in order."""
    out: List[str] = []
    for name in config.getoption("engine") or ["ckpt"]:
        if name == engines.MUTANT_PREFIX + "all":
            out += [engines.MUTANT_PREFIX + m for m in engines.mutant_names()]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def scenarios_root(path: Path) -> Optional[Path]:
    """The nearest ancestor directory named ``scenarios`` (None: not a scenario)."""
    for parent in path.resolve().parents:
        if parent.name == "scenarios":
            return parent
    return None


def pytest_collect_file(parent, file_path: Path):
    if file_path.suffix == ".yaml" and scenarios_root(file_path) is not None:
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


def scenario_deadline(sc: dict, scale: float) -> float:
    """Seconds after which a scenario item is stopped as hung."""
    steps = {**runner.DEFAULT_TIMEOUTS, **(sc.get("timeouts") or {})}
    return round(2 * (sum(steps.values()) + 300) * max(1.0, float(scale or 1)))


class ScenarioFile(pytest.File):
    def collect(self):
        try:
            sc = schema.load(str(self.path))
        except schema.SchemaError as e:
            e.path = os.path.relpath(str(self.path))
            raise self.CollectError(str(e)) from None
        names = engine_names(self.config)
        for name in names:
            item = ScenarioItem.from_parent(self, name=self.path.stem + (f"[{name}]" if len(names) > 1 else ""),
                                            scenario=sc, engine_name=name)
            _mark(item, sc, name, self.config)
            yield item


def _mark(item: pytest.Item, sc: dict, engine_name: str, config, factor: float = 1.0) -> None:
    item.add_marker("scenario")
    if config.getoption("target") == "guest":
        item.add_marker("guest")
    item.add_marker("engine_mutant" if engine_name.startswith(engines.MUTANT_PREFIX) else f"engine_{engine_name}")
    # The last line of defence against a hang the step timeouts miss
    # (pytest-timeout): every step at its limit, a guest boot, twice over.
    item.add_marker(pytest.mark.timeout(factor * scenario_deadline(sc, config.getoption("guest_timeout_scale"))))
    for tag in sc.get("tags", []):
        item.add_marker(tag)


class ScenarioFailure(Exception):
    """A scenario whose outcome does not meet its ``expect``."""

    def __init__(self, res: runner.Result, note: str):
        self.res, self.note = res, note
        super().__init__(note)


class ScenarioItem(pytest.Item):
    def __init__(self, *, scenario: dict, engine_name: str, **kw):
        super().__init__(**kw)
        self.scenario = scenario
        self.engine_name = engine_name
        self.expect = scenario["expect"]      # replaced by the one in force for the target's kernel

    @property
    def sid(self) -> str:
        rel = self.path.resolve().relative_to(scenarios_root(self.path)).with_suffix("")
        return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(rel.parts) + "-" + self.engine_name)

    @property
    def scenario_key(self) -> str:
        """The scenario's name in the reports (its file)."""
        return self.nodeid.split("::")[0]

    def runtest(self):
        crucible: Crucible = self.config._crucible
        engine = engines.make(self.engine_name)
        row = {"scenario": self.scenario_key, "engine": self.engine_name,
               "expected": runner.expected_text(self.scenario["expect"]), "name": self.scenario["name"],
               "distro": crucible.distro, "worker": crucible.worker, "began": round(time.time(), 2)}
        if self.scenario.get("restore_on") == "other" and not crucible.can_migrate:
            pytest.skip("restore_on: other needs a second guest; --target local has only this host")
        if not crucible.can_migrate:
            from .kinds.process import local_unmet
            why = local_unmet(self.scenario)
            if why:
                pytest.skip(why)
        if "program" in self.scenario["workload"] and not crucible.can_migrate:
            from .programrun import missing_here
            why = missing_here(self.scenario, os.environ.get("CRUCIBLE_PROGRAMS_DIR", ""))
            if why:
                pytest.skip(why)
        t0 = time.monotonic()
        clock = crucible.cpu_begin()
        try:
            target = crucible.primary()
            if schema.below_min_kernel(self.scenario, target.kernel):
                pytest.skip(schema.below_min_kernel(self.scenario, target.kernel))
            revert_s = crucible.revert_s
            res = runner.run_scenario(self.scenario, self.sid, engine, target,
                                      other=crucible.other if crucible.can_migrate else None,
                                      scale=self.config.getoption("guest_timeout_scale"))
        except HarnessError as e:
            row.update(outcome="error", got=f"harness error at {e.step}", passed=False, note=e.message,
                       duration=round(time.monotonic() - t0, 2), cpu=crucible.cpu_end(clock))
            if crucible._prep:
                row["guest_prep"] = crucible.take_prep()
            self.user_properties.append(("crucible", row))
            crucible.failed = True
            raise
        expect = schema.effective_expect(self.scenario, target.kernel, crucible.distro)
        row["expected"] = runner.expected_text(expect)
        row["kernel"] = target.kernel
        self.expect = expect
        verdict = runner.judge(expect, res, strict=engine.strict)
        if revert_s is not None:    # part of the scenario's duration no step holds
            res.timings["revert"] = revert_s
        row.update(outcome=res.outcome, got=runner.outcome_text(res), passed=verdict.passed, note=verdict.note,
                   duration=round(time.monotonic() - t0, 2), cpu=crucible.cpu_end(clock), timings=res.timings,
                   detail=res.detail,
                   engine_start=sorted(set(res.engine_start) - {""}), workload_start=res.workload_start,
                   failed_checks=res.failed_checks()[:20], refusals=res.refusals,
                   engine_notes=[ln.strip() for ln in res.engine_stderr.splitlines()
                                 if ln.startswith("mutant ")])
        if crucible._prep:       # guests this scenario waited for (boot, install, agent, snapshot)
            row["guest_prep"] = crucible.take_prep()
        if res.outcome in ("crashed", "hung") and res.diagnostics:
            row["diagnostics"] = res.diagnostics[-4000:]     # the guest's serial tail
        self.user_properties.append(("crucible", row))
        if not verdict.passed:
            crucible.failed = True
            raise ScenarioFailure(res, verdict.note)

    def run_candidate(self, sc: dict, sid: str):
        """Run ``sc`` as this item would and judge it: (Result, Judgement).
        For the shrinker (GeneratedItem)."""
        crucible: Crucible = self.config._crucible
        engine = engines.make(self.engine_name)
        target = crucible.primary()
        res = runner.run_scenario(sc, sid, engine, target, other=crucible.other if crucible.can_migrate else None,
                                  scale=self.config.getoption("guest_timeout_scale"))
        return res, runner.judge(schema.effective_expect(sc, target.kernel, crucible.distro), res, strict=engine.strict)

    def repr_failure(self, excinfo, style=None):
        e = excinfo.value
        if isinstance(e, ScenarioFailure):
            return self._failure_text(e.res, e.note)
        if isinstance(e, HarnessError):
            return f"harness error in scenario {self.scenario['name']!r} ({self.path.name}) at step {e.step}:\n{e}"
        return super().repr_failure(excinfo, style=style)

    def _failure_text(self, res: runner.Result, note: str) -> str:
        out = [f"scenario: {self.scenario['name']} ({self.nodeid.split('::')[0]})  engine: {self.engine_name}",
               f"expected: {runner.expected_text(self.expect)}",
               f"outcome:  {runner.outcome_text(res)} (decided at step {res.step})",
               f"why:      {note}"]
        if res.detail:
            out += ["--- detail ---", res.detail.strip()]
        if res.engine_stderr.strip():
            out += ["--- engine stderr ---", res.engine_stderr.strip()[-4000:]]
        if res.verdict is not None:
            failed = res.failed_checks()
            out.append(f"--- workload verdict: ok={res.verdict.get('ok')}, {len(failed)} of "
                       f"{len(res.verdict.get('checks', []))} checks failed ---")
            out += [f"fd {c.get('fd')}: {c.get('what')}: expected {c.get('expected')!r}, got {c.get('got')!r}"
                    for c in failed[:30]]
            if res.verdict.get("error"):
                out.append(res.verdict["error"])
        if res.diagnostics.strip():
            out += ["--- guest serial console (tail) ---", res.diagnostics.strip()]
        hint = self.config._crucible.ssh_hint()
        if hint:
            out.append(hint)
        return "\n".join(out)

    def reportinfo(self):
        return self.path, 0, f"scenario: {self.scenario['name']} [{self.engine_name}]"


#: under the run's reports: which failure classes a case of this run was shrunk for
SHRINK_CLAIMS = "shrink-claims"


def failure_signature(res: runner.Result) -> str:
    """What kind of failure a result is, the same for the smaller cases the
    shrinker tries: the outcome, and for a refusal its reasons and phase
    (not its fds: dropping fds renumbers nothing but changes the list)."""
    if res.outcome == "refused":
        return f"refused {','.join(sorted({r.get('reason', '?') for r in res.refusals}))} at {res.at}"
    return res.outcome


def failure_classes(res: runner.Result) -> List[str]:
    """The kinds of failure in a result, finer than failure_signature: a
    corruption is one class per failed check, its numbers (addresses, fds,
    sizes) taken out ("corrupted: state: maps.#-#.advice"), so that the
    same wrong thing seen in another case, another mapping or fd, is the
    same class. For the shrinker's once-per-run claims (shrink.claim)."""
    if res.outcome != "corrupted":
        return [failure_signature(res)]
    out = {"corrupted: " + re.sub(r"\b(0x)?[0-9a-f]*\d[0-9a-f]*\b", "#", str(c.get("what")))
           for c in res.failed_checks()}
    return sorted(out) or ["corrupted"]


class GeneratedItem(ScenarioItem):
    """A generated scenario (--generate); a failure is shrunk and the minimal
    case written to --found-dir."""

    def __init__(self, *, case_id: str, seed: int, **kw):
        super().__init__(**kw)
        self.case_id, self.seed = case_id, seed

    @property
    def sid(self) -> str:
        return f"{self.case_id}-{self.engine_name}"

    @property
    def scenario_key(self) -> str:
        return f"generated/{self.case_id}"

    def runtest(self):
        try:
            super().runtest()
        except ScenarioFailure as e:
            found, why = self._shrink(e.res, e.note)
            if found or why:
                e.note += f"\nshrunk to {found}" if found else f"\n{why}"
            for key, row in self.user_properties:
                if key == "crucible":
                    row["failure_classes"] = failure_classes(e.res)
                    if found or why:
                        row.update({"found": found} if found else {"not_shrunk": why})
            raise

    def _shrink(self, res: runner.Result, note: str) -> Tuple[Optional[str], str]:
        """(the shrunk case's file, "") or (None, why it was not shrunk)."""
        from harness import shrink
        budget = self.config.getoption("shrink_budget")
        if budget <= 0:
            return None, ""
        fresh, others = shrink.claim(str(REPORTS_DIR / SHRINK_CLAIMS), failure_classes(res), self.case_id)
        if not fresh:
            return None, f"not shrunk: the same failure as {', '.join(others)}, shrunk there"
        # the candidate must fail the same way and still show what was new
        # in this case (else a smaller case would keep only a failure some
        # other case was shrunk for)
        signature = failure_signature(res) + ("" if fresh == [failure_signature(res)] else
                                              " with " + "; ".join(fresh))

        def attempt(sc: dict, k: int):
            try:
                r, verdict = self.run_candidate(sc, f"{self.sid}-shrink{k}")
            except HarnessError as e:
                return False, "harness error", e.message
            sig = failure_signature(r)
            if sig == failure_signature(res) and set(fresh) <= set(failure_classes(r)):
                sig = signature
            return not verdict.passed, sig, verdict.note
        shrunk = shrink.shrink(self.scenario, signature, attempt, budget=budget, note=note,
                               seconds=scenario_deadline(self.scenario, self.config.getoption("guest_timeout_scale")))
        path = shrink.write_found(self.config.getoption("found_dir"), self.case_id, self.seed, self.scenario, shrunk)
        return os.path.relpath(path), ""

    def reportinfo(self):
        return self.path, 0, f"generated scenario {self.case_id}: {self.scenario['name']} [{self.engine_name}]"


class GeneratedCases(pytest.Collector):
    """The --generate cases (harness/generate.py), one item per case and engine."""

    def collect(self):
        from harness import generate
        cfg = self.config
        names = cfg.getoption("engine") or ["ckpt"]
        seed = cfg.getoption("seed")
        migrate = cfg.getoption("target") == "guest"
        for cid, sc in generate.generate(cfg.getoption("generate"), seed, migrate=migrate):
            for name in dict.fromkeys(names):
                item = GeneratedItem.from_parent(self, name=cid + (f"[{name}]" if len(set(names)) > 1 else ""),
                                                 scenario=sc, engine_name=name, case_id=cid, seed=seed)
                _mark(item, sc, name, cfg, factor=2.0)   # room for the shrinking runs
                yield item


def pytest_collection_modifyitems(session, config, items):
    """With --generate N the generated cases replace the YAML files (the same
    list on every xdist worker: generation is deterministic)."""
    if config.getoption("generate") > 0:
        gen = GeneratedCases.from_parent(session, name="generated", path=REPO / "scenarios")
        items[:] = list(gen.collect())
    items[:] = migrate_first(items)


def migrate_first(items: list) -> list:
    """The scenarios that restore on a second guest first (a stable sort:
    the same order on every xdist worker). Each worker that gets one boots
    a second guest: at the start of the run that boot overlaps the other
    worker's scenarios (--dist worksteal hands the first block to one
    worker, so one boot), where at the end it was the run's tail."""
    return sorted(items, key=lambda it: 0 if (getattr(it, "scenario", None) or {}).get("restore_on") == "other"
                  else 1)


def _die_with_parent() -> None:
    """An xdist worker dies with the pytest that started it (prctl(2)
    PR_SET_PDEATHSIG): a SIGKILLed controller cannot tell its workers to stop,
    and a worker busy in a scenario would keep its guests up until the
    scenario ended. Its QEMUs die with it (vm.guest sets the same on them)."""
    import ctypes
    import signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)   # 1 = PR_SET_PDEATHSIG


def host_distro(os_release: str = "/etc/os-release") -> str:
    """This host's Debian codename (``VERSION_CODENAME``), "" when unknown."""
    try:
        for line in Path(os_release).read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return ""


class Crucible:
    """Per-process state: the targets of this (xdist worker) process and,
    on the controller, the rows of the summary."""

    def __init__(self, config):
        self.config = config
        self.rows: List[Dict] = []
        self.failed = False
        self.local = config.getoption("target") == "local"
        self.can_migrate = not self.local
        self._primary: Optional[Target] = None
        self._other: Optional[Target] = None
        self._guests: list = []
        self._dirty: Dict[int, bool] = {}
        self._prep: List[Dict] = []
        #: seconds the primary target's last reset took (its revert to the
        #: golden snapshot; None: booted, or not reset): the row's ``revert``
        self.revert_s: Optional[float] = None
        wi = getattr(config, "workerinput", None)
        self.worker = wi["workerid"] if wi else "gw0"
        self.is_worker = wi is not None
        if self.is_worker:
            _die_with_parent()
        #: the distro axis value of the reports: the guests' (the option), or
        #: this host's release on --target local
        self.distro = host_distro() if self.local else (config.getoption("distro") or "bookworm")

    # -- targets -------------------------------------------------------------------
    def primary(self) -> Target:
        if self._primary is None:
            self._primary = LocalTarget() if self.local else self._boot("a")
        self._primary = self._fresh(self._primary, "a")
        return self._primary

    def other(self) -> Target:
        """The second guest (``restore_on: other``): booted on first use, not
        cloned from the first one's snapshot, so it has its own boot id."""
        if self._other is None:
            self._other = self._boot("b")
        self._other = self._fresh(self._other, "b")
        return self._other

    def _fresh(self, t: Target, suffix: str) -> Target:
        """Revert a used guest to its golden snapshot before the next scenario;
        a guest that died or cannot revert is replaced by a new one."""
        self.revert_s = None
        if self._dirty.get(id(t)):
            try:
                if isinstance(t, GuestTarget) and not t.guest.alive():
                    raise HarnessError(f"guest {t.name} is not alive")
                t0 = time.monotonic()
                t.reset()
                self.revert_s = round(time.monotonic() - t0, 3)
            except Exception as e:
                print(f"\ncrucible: guest {t.name} could not be reset ({e}); booting a new one")
                self._drop(t)
                t = self._boot(suffix)
        self._dirty[id(t)] = True
        return t

    def _drop(self, t: Target) -> None:
        if isinstance(t, GuestTarget) and t.guest in self._guests:
            self._guests.remove(t.guest)
            try:
                t.guest.shutdown(hard=True)
            except Exception as e:  # it is being replaced anyway; say why it would not stop
                print(f"crucible: shutting down guest {t.name} failed: {e}")

    def _boot(self, suffix: str) -> GuestTarget:
        """Boot a guest, install the harness's files, take the golden snapshot.

        Raises HarnessError (step ``boot``) when the guest package is missing
        or the guest cannot be built, booted or reached (the VmError's text).
        """
        try:
            from vm import VmError
        except ImportError as e:
            raise HarnessError(f"the guest package (vm) is not available: {e}; use --target local for host runs",
                               step="boot") from None
        try:
            return self._boot_guest(suffix)
        except VmError as e:
            raise HarnessError(f"guest {self.worker}{suffix} could not be started", step="boot", detail=str(e)) from None

    def _boot_guest(self, suffix: str) -> GuestTarget:
        from vm import Guest, VmError, ensure_image
        from vm.arch import get_arch
        opt = self.config.getoption
        img = ensure_image(opt("arch"), kernel=opt("kernel") or None, distro=opt("distro") or "bookworm")
        # Both guests of this worker share an L2 segment (harness/segment.py):
        # each one's datagram socket sends to the other's.
        from . import segment
        other = "b" if suffix == "a" else "a"
        sock = f"/tmp/crucible-seg-{os.getpid()}-{self.worker}"
        from vm.accel import choose_accel
        from . import bootcache
        from vm.paths import cache_dir
        t0 = time.monotonic()
        # resolved first: a kept boot is one accelerator's (harness/bootcache.py)
        accel = choose_accel(opt("accel"), opt("arch"), img).accel

        def make(from_snapshot=None, wait_ssh=True):
            return Guest(arch=opt("arch"), accel=accel, name=f"{self.worker}{suffix}",
                         log_dir=str(REPORTS_DIR / "guests"), image=img, memory_mb=512, from_snapshot=from_snapshot,
                         segment=(f"{sock}{suffix}", f"{sock}{other}", segment.MACS.get(suffix, segment.MACS["b"])),
                         wait_ssh=wait_ssh)

        def booted_key(g) -> str:
            return bootcache.key(g.image, get_arch(g.arch).qemu_binary, accel, bootcache.placeholder_argv(g))
        slot = f"{img.dir.name}-{suffix}"
        golden = None     # (cache root, key): a prepared guest kept between runs (harness/goldencache.py)
        if bootcache.enabled() and goldencache.enabled():
            golden = (cache_dir() / "golden", goldencache.key(booted_key(make()), REPO))
            kept = self._load_golden(make, slot, *golden, t0)
            if kept is not None:
                return kept
        if bootcache.enabled():
            guest, how = bootcache.launch(make, cache_dir() / "booted", slot, booted_key)
        else:
            guest, how = make(), "booted"
            guest.__enter__()
        self._guests.append(guest)
        t = GuestTarget(guest, time_scale=_time_scale(guest))
        t1 = time.monotonic()
        t.install(REPO / "engine")     # engine and guest files: one SSH command
        t2 = time.monotonic()
        t.start_agent()  # resident in the snapshot: every revert brings it back
        if t.agent_note:
            print(f"\ncrucible: guest {t.name}: steps go over SSH: {t.agent_note}")
        if t.digests_note:
            print(f"\ncrucible: guest {t.name}: {t.digests_note}")
        zeroed = t.zero_free_memory()
        if zeroed:
            print(f"\ncrucible: guest {t.name}: {zeroed}")
        t3 = time.monotonic()
        guest.snapshot(goldencache.TAG)
        t4 = time.monotonic()
        kept = ""
        if golden is not None and t.agent is not None:
            try:
                goldencache.store(guest, golden[0], slot, golden[1], t.facts())
                kept = "kept"
            except (OSError, VmError) as e:    # only a cache: the next run prepares its guest again
                kept = f"not kept: {e}"
                print(f"\ncrucible: guest {t.name}: its golden state not kept for next time: {e}")
        # where a worker's first scenario's time went (its row's guest_prep)
        self._prep.append({"guest": t.name, "how": how, "launch": round(t1 - t0, 2), "install": round(t2 - t1, 2),
                           "agent": round(t3 - t2, 2), "snapshot": round(t4 - t3, 2),
                           "golden": kept or "off", "keep": round(time.monotonic() - t4, 2),
                           "pyc_compiled": t.pyc_compiled, "digests_seeded": t.digests_seeded,
                           "launch_steps": {k: round(v, 2) for k, v in guest.timings.items()}})
        return t

    def _load_golden(self, make, slot: str, root, key: str, t0: float) -> Optional[GuestTarget]:
        """A guest started from this slot's kept golden snapshot, its agent
        checked (harness/goldencache.py); None when there is none, or it
        does not load or answer (then it is removed)."""
        from vm import VmError
        from .agent_client import AgentError
        found = goldencache.find(root, slot, key)
        if found is None:
            return None
        path, facts = found
        guest = make((str(path), goldencache.TAG), wait_ssh=False)     # SSH only if a step needs it
        # Loaded, it prints nothing of a boot: its report shows the console
        # the guest had when it was kept (as bootcache does for a kept boot).
        guest.console_before = (f"[crucible: loaded from the kept golden {path.name}, whose console was:]\n"
                                + str(facts.get("console") or "(not kept)").rstrip("\n")
                                + "\n[crucible: loaded here; this guest's own console follows]")
        try:
            guest.__enter__()
            t1 = time.monotonic()
            t = GuestTarget(guest, time_scale=_time_scale(guest))
            t.adopt(facts)
        except (VmError, AgentError, OSError) as e:
            print(f"\ncrucible: the kept golden {path.name} did not come up ({getattr(e, 'message', e)}); "
                  "preparing the guest")
            try:
                guest.shutdown(hard=True)
            except Exception as e2:  # it is being replaced anyway; say why it would not stop
                print(f"crucible: shutting down guest {guest.name} failed: {e2}")
            goldencache.drop(root, slot, key)
            return None
        self._guests.append(guest)
        self._prep.append({"guest": t.name, "how": "golden", "launch": round(t1 - t0, 2),
                           "agent": round(time.monotonic() - t1, 2), "digests_seeded": t.digests_seeded,
                           "launch_steps": {k: round(v, 2) for k, v in guest.timings.items()}})
        return t

    def cpu_begin(self) -> tuple:
        """A scenario's start for :meth:`cpu_end` (harness/cpuclock.py)."""
        return cpuclock.take(self._qemu_pids() + [os.getpid()]), cpuclock.host_stat()

    def cpu_end(self, begun: tuple) -> Dict[str, float]:
        """Where the scenario's wall time went on the host (seconds): this
        worker's QEMUs on a CPU (``qemu``) and runnable but waiting for one
        (``qemu_wait``), the same for this worker process (``harness``,
        ``harness_wait``), and how busy the whole host was (``host_busy``:
        the share of all CPUs' time not idle, other jobs included)."""
        before, stat = begun
        pids = self._qemu_pids()
        after = cpuclock.take(pids + [os.getpid()])
        me = os.getpid()
        q = cpuclock.spent(before, {p: v for p, v in after.items() if p != me})
        h = cpuclock.spent(before, {p: v for p, v in after.items() if p == me})
        return {"qemu": q[0], "qemu_wait": q[1], "harness": h[0], "harness_wait": h[1],
                "host_busy": cpuclock.busy(stat, cpuclock.host_stat())}

    def _qemu_pids(self) -> List[int]:
        return [p for p in (getattr(g, "pid", lambda: None)() for g in self._guests) if p]

    def take_prep(self) -> List[Dict]:
        """The preparations of the guests booted since the last call."""
        out, self._prep = self._prep, []
        return out

    def ssh_hint(self) -> str:
        if not self.config.getoption("keep_guest") or not self._guests:
            return ""
        return "guests kept up; ssh in with:\n" + "\n".join(
            "  " + (" ".join(g.ssh_command()) if isinstance(g.ssh_command(), list) else str(g.ssh_command()))
            for g in self._guests)

    def close(self) -> None:
        if self.config.getoption("keep_guest") and self.failed and self._guests:
            # QEMU dies with this process (the vm package sets PR_SET_PDEATHSIG),
            # so "keeping" a guest means waiting here while a person looks.
            print("\n" + self.ssh_hint())
            if not self.is_worker and sys.stdin is not None and sys.__stdin__.isatty():
                capman = self.config.pluginmanager.getplugin("capturemanager")
                if capman is not None:
                    capman.suspend_global_capture(in_=True)
                input("crucible: press Enter to shut the guests down ")
            else:
                print("crucible: the guests stop when pytest exits; run without -n from a terminal to keep them")
        for g in self._guests:
            try:
                g.__exit__(None, None, None)
            except Exception as e:  # report, keep shutting down the others
                print(f"crucible: shutting down guest {getattr(g, 'name', '?')} failed: {e}")
        self._guests.clear()
        if isinstance(self._primary, LocalTarget):
            self._primary.close()


def _time_scale(guest) -> float:
    """A guest's step-timeout factor: TCG is slower than KVM."""
    return 1.0 if str(getattr(guest, "accel", "tcg")) == "kvm" else 2.0


def pytest_runtest_logreport(report):
    """Collect each scenario's row on the controller (xdist ships a worker's
    user_properties with its reports; a worker process collects nothing)."""
    cfg = _CONFIG.get("config")
    if cfg is None or getattr(cfg, "workerinput", None) is not None:
        return
    for key, value in getattr(report, "user_properties", []):
        if key == "crucible" and report.when == "call":
            cfg._crucible.rows.append(value)
            _append_row(value)


def _append_row(row: Dict) -> None:
    """Each row also goes to reports/rows.jsonl as it comes: a long run
    (make mutants) that dies before its summary keeps what it found."""
    try:
        os.makedirs(REPORTS_DIR, exist_ok=True)
        with open(REPORTS_DIR / "rows.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    except OSError as e:   # the summary at the end is the report; this is a spare
        print(f"crucible: cannot append to {REPORTS_DIR / 'rows.jsonl'}: {e}")


_CONFIG: Dict[str, object] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    _CONFIG["config"] = session.config
    if getattr(session.config, "workerinput", None) is None:
        try:
            os.unlink(REPORTS_DIR / "rows.jsonl")
        except OSError:
            pass
        import shutil
        shutil.rmtree(REPORTS_DIR / SHRINK_CLAIMS, ignore_errors=True)     # this run's claims only


def pytest_sessionfinish(session, exitstatus):
    c = getattr(session.config, "_crucible", None)
    if c is not None:
        c.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    c: Crucible = config._crucible
    if c.is_worker or not c.rows:
        return
    terminalreporter.section("crucible scenarios")
    terminalreporter.write_line(report_mod.table(c.rows))
    path = report_mod.write_json(c.rows, str(REPORTS_DIR), {
        "engines": engine_names(config), "arch": config.getoption("arch"),
        "kernel": config.getoption("kernel"), "distro": c.distro,
        "target": config.getoption("target"),
        **({"generate": config.getoption("generate"), "seed": config.getoption("seed")}
           if config.getoption("generate") > 0 else {})})
    terminalreporter.write_line(f"written: {os.path.relpath(path)} (and reports/scenarios.json)")
    if config.getoption("generate") > 0:
        terminalreporter.section("generated scenarios")
        terminalreporter.write_line(report_mod.generated_summary(c.rows, config.getoption("seed")))
