"""Engine adapters: how to ask an engine to dump / restore, and what it said.

``ckpt`` speaks the contract in DESIGN.md (exit 0 / 2 usage / 3 refused /
4 failed, ``--json``); ``criu`` (Debian's, for comparison runs) has no
refusal codes: any failure of criu counts as its way of refusing, named
``criu`` with the last error lines of its log.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .targets import RunResult, Target

try:
    from engine.reasons import REASONS
except ImportError:  # pragma: no cover
    REASONS = {}

_REFUSAL_LINE = re.compile(r"^ckpt: refused: (?:(?P<head>.*?): )?(?P<reason>[a-z][a-z-]*)(?:: (?P<detail>.*))?$")


@dataclass
class EngineResult:
    """``status``: ok | refused | failed; ``contract`` lists breaches of the CLI
    contract (an exit code or output the engine must not produce)."""

    status: str
    rc: int
    refusals: List[Dict] = field(default_factory=list)
    message: str = ""
    pid: Optional[int] = None
    stderr: str = ""
    contract: List[str] = field(default_factory=list)
    #: the time the engine reports for its own work (ckpt's total_ms or
    #: restore_ms), seconds; None when it reports none (criu, a refusal)
    own_s: Optional[float] = None


class Engine:
    name = "engine"
    strict = True            # expectations describe this engine: differences fail
    creates_dir = True       # the engine creates the image dir itself

    def dump_argv(self, t: Target, pid: int, img: str, opts: dict) -> List[str]:
        raise NotImplementedError

    def restore_argv(self, t: Target, img: str, pidfile: str, tty: str = "") -> List[str]:
        """``tty``: the terminal a --shell-job process is restored on."""
        raise NotImplementedError

    def parse(self, r: RunResult, t: Target, img: str) -> EngineResult:
        raise NotImplementedError


class Ckpt(Engine):
    name = "ckpt"

    def dump_argv(self, t: Target, pid: int, img: str, opts: dict) -> List[str]:
        argv = t.ckpt_argv() + ["dump", "-t", str(pid), "-D", img, "--json"]
        if opts.get("leave_running"):
            argv.append("--leave-running")
        if "ghost_limit" in opts:
            argv += ["--ghost-limit", str(opts["ghost_limit"])]
        if "file_validation" in opts:
            argv += ["--file-validation", opts["file_validation"]]
        if opts.get("shell_job"):
            argv.append("--shell-job")
        return argv

    def restore_argv(self, t: Target, img: str, pidfile: str, tty: str = "") -> List[str]:
        return t.ckpt_argv() + ["restore", "-D", img, "--pidfile", pidfile, "--json"] + (["--tty", tty] if tty else [])

    def parse(self, r: RunResult, t: Target, img: str) -> EngineResult:
        return parse_ckpt(r)


def parse_ckpt(r: RunResult) -> EngineResult:
    """Read a ``ckpt ... --json`` run against the contract."""
    out = EngineResult("failed", r.rc, stderr=r.stderr)
    doc = None
    try:
        doc = json.loads(r.stdout) if r.stdout.strip() else None
    except ValueError:
        out.contract.append("--json stdout is not one JSON object")
    if "Traceback (most recent call last)" in r.stderr:
        out.contract.append("a Python traceback on stderr")
    if r.rc == 0:
        out.status = "ok"
        res = (doc or {}).get("result") or {}
        out.pid = res.get("pid") if isinstance(res, dict) else None
        own = res.get("total_ms", res.get("restore_ms")) if isinstance(res, dict) else None
        if isinstance(own, (int, float)) and not isinstance(own, bool):
            out.own_s = own / 1000
        if doc is not None and doc.get("ok") is not True:
            out.contract.append('exit 0 without "ok": true')
    elif r.rc == 3:
        out.status = "refused"
        out.refusals = list((doc or {}).get("refusals") or [])
        if not out.refusals:    # fall back to the stderr lines
            for line in r.stderr.splitlines():
                m = _REFUSAL_LINE.match(line.strip())
                if m:
                    out.refusals.append({"reason": m.group("reason"), "message": line.strip()})
        if not out.refusals:
            out.contract.append("exit 3 without any refusal reason")
        for ref in out.refusals:
            if ref.get("reason") not in REASONS:
                out.contract.append(f"undefined reason code {ref.get('reason')!r}")
    else:
        out.message = (doc or {}).get("message", "") if isinstance(doc, dict) else ""
        if r.rc not in (2, 4):
            out.contract.append(f"exit code {r.rc} is not in the contract (0, 2, 3, 4)")
    if not out.message:
        out.message = r.stderr.strip()[-2000:]
    return out


_CRIU_TCP = ["--tcp-established", "--network-lock", "nftables"]


class Criu(Engine):
    name = "criu"
    strict = False
    creates_dir = False

    def dump_argv(self, t: Target, pid: int, img: str, opts: dict) -> List[str]:
        # The workload is detached (setsid, stdio on /dev/null): no --shell-job.
        # --tcp-established: criu refuses connected TCP without it; its network
        # lock through nftables (libnftables is a criu dependency; the guest
        # has no iptables binary, criu's default).
        argv = ["criu", "dump", "-t", str(pid), "-D", img, "-o", "dump.log", "-v4"] + _CRIU_TCP
        if opts.get("leave_running"):
            argv.append("--leave-running")
        if opts.get("shell_job"):
            argv.append("--shell-job")
        return argv

    def restore_argv(self, t: Target, img: str, pidfile: str, tty: str = "") -> List[str]:
        # criu --shell-job restores onto its own terminal (stdin), which the
        # harness cannot give it: the image's terminal is named by tty, for ckpt
        return ["criu", "restore", "-D", img, "-d", "--pidfile", pidfile, "-o", "restore.log", "-v4"] + _CRIU_TCP \
            + (["--shell-job"] if tty else [])

    def parse(self, r: RunResult, t: Target, img: str) -> EngineResult:
        if r.rc == 0:
            return EngineResult("ok", 0, stderr=r.stderr)
        log = ""
        for name in ("restore.log", "dump.log"):
            try:
                log = t.get_bytes(f"{img}/{name}").decode(errors="replace")
                break
            except Exception:
                continue
        errors = [ln for ln in log.splitlines() if "Error" in ln or "error" in ln][-5:]
        msg = "\n".join(errors) or r.stderr.strip()[-2000:] or f"criu exited {r.rc}"
        return EngineResult("refused", r.rc, refusals=[{"reason": "criu", "message": msg}],
                            message=msg, stderr=r.stderr + ("\n" + "\n".join(errors) if errors else ""))


class Mutant(Ckpt):
    """ckpt with exactly one thing broken (harness/mutants.py, run on the
    target as a script next to the engine): a test fixture for the judge,
    which must fail it in at least one scenario. Same CLI contract as ckpt;
    it says on stderr what it broke ("mutant NAME: applied: ...") or that
    the image had nothing to break ("mutant NAME: no target in image")."""

    def __init__(self, mutant: str):
        self.mutant = mutant
        self.name = f"mutant:{mutant}"

    def _argv(self, t: Target, ckpt_argv: List[str]) -> List[str]:
        return t.script("mutants.py") + [self.mutant] + ckpt_argv[len(t.ckpt_argv()):]

    def dump_argv(self, t: Target, pid: int, img: str, opts: dict) -> List[str]:
        return self._argv(t, super().dump_argv(t, pid, img, opts))

    def restore_argv(self, t: Target, img: str, pidfile: str, tty: str = "") -> List[str]:
        return self._argv(t, super().restore_argv(t, img, pidfile, tty))


ENGINES = {"ckpt": Ckpt, "criu": Criu}
MUTANT_PREFIX = "mutant:"


def mutant_names() -> List[str]:
    from . import mutants
    return mutants.names()


def known() -> List[str]:
    """Every engine name --engine accepts."""
    return list(ENGINES) + [MUTANT_PREFIX + n for n in mutant_names()]


def make(name: str) -> Engine:
    """An adapter by name (``mutant:NAME`` for a mutant); raises KeyError
    naming the known ones."""
    if name.startswith(MUTANT_PREFIX):
        m = name[len(MUTANT_PREFIX):]
        if m not in mutant_names():
            raise KeyError(f"unknown mutant {m!r} (known: {', '.join(mutant_names())})")
        return Mutant(m)
    if name not in ENGINES:
        raise KeyError(f"unknown engine {name!r} (known: {', '.join(ENGINES)}, mutant:NAME)")
    return ENGINES[name]()
