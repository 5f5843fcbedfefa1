"""Where a scenario's commands run: a QEMU guest, or this host.

Both targets run argv lists (never a shell string), move bytes, and know
where the work dirs, the guest-side scripts and the engine live. A command
that outlives its timeout raises :class:`StepTimeout` (the outcome ``hung``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from . import chaos
from .errors import GuestLost, HarnessError, StepTimeout

REPO = Path(__file__).resolve().parent.parent
# The stdlib-only files the guest runs (the workload and the world steps),
# and the packages it imports (copied as directories next to them).
GUEST_FILES = ("records.py", "jsonio.py", "seeded.py", "sysapi.py", "world.py", "procstate.py", "memstate.py",
               "workload.py",
               "workload_run.py", "mutants.py", "program.py", "warmfork.py", "zygote.py", "hostsysctl.py")
GUEST_PACKAGES = ("kinds",)


def guest_files() -> List[str]:
    """Every file install copies, relative to harness/ (and to the guest's
    scripts dir: the same layout, flat files plus package directories)."""
    out = list(GUEST_FILES)
    for pkg in GUEST_PACKAGES:
        out += sorted(f"{pkg}/{p.name}" for p in (REPO / "harness" / pkg).glob("*.py"))
    return out
PR_SET_CHILD_SUBREAPER = 36   # prctl(2)


@dataclass
class RunResult:
    rc: int
    stdout: str
    stderr: str
    duration: float
    #: a ckpt command: "warm" (forked from the agent's warm engine, harness/zygote.py),
    #: "exec", or "exec: <why not warm>"; "" for any other command
    start: str = ""


class Target:
    """The interface the runner uses (see LocalTarget / GuestTarget)."""

    name = "target"
    base = "/srv/crucible"                 # scenario dirs live under here
    #: where the image's own programs are (vm/recipe.py PROGRAMS_DIR): ``{programs}``
    programs_dir = "/usr/lib/crucible/programs"
    scripts = "/opt/crucible/harness"      # GUEST_FILES live here
    python = "python3"
    time_scale = 1.0                       # multiplies every step timeout
    can_migrate = False

    def run(self, argv: Sequence[str], timeout: float, step: str = "") -> RunResult:
        raise NotImplementedError

    def put_bytes(self, data: bytes, path: str) -> None:
        raise NotImplementedError

    def get_bytes(self, path: str) -> bytes:
        raise NotImplementedError

    def fresh_file(self, data: bytes, path: str, clear: str) -> None:
        """Remove the tree ``clear`` (if there), then write ``path`` (its
        parent directories made)."""
        r = self.run(["rm", "-rf", clear], 60 * getattr(self, "time_scale", 1.0), step="setup")
        if r.rc != 0:
            raise HarnessError(f"cannot remove {clear}: {r.stderr[-500:]}", step="setup")
        self.put_bytes(data, path)

    def ckpt_argv(self) -> List[str]:
        raise NotImplementedError

    kernel = ""                            # uname -r of the kernel the scenarios run on

    def script(self, name: str) -> List[str]:
        return [self.python, f"{self.scripts}/{name}"]

    def reset(self) -> None:
        """Back to a clean state before a scenario."""

    def scenario_begins(self) -> None:
        """A scenario starts using this target (its cleanup() ends it)."""

    def settle(self, pids: Sequence[int]) -> None:
        """Let dead PIDs become free (reap them where this target must)."""

    def cleanup(self, pids: Sequence[int]) -> None:
        """Kill (by PID, workloads only) and reap what a scenario left."""

    def diagnostics(self) -> str:
        """Text for a failure report (a guest's serial console tail)."""
        return ""


class LocalTarget(Target):
    """Runs the steps on this host: subprocesses, the repo's engine through
    ``python3 -m engine``, work dirs under a temporary directory.

    The host's PID 1 reaps orphans slowly (ENGINE-NOTES.md), and a same-PID
    restore needs the dumped PID free; so this process becomes a child
    subreaper (prctl(2) PR_SET_CHILD_SUBREAPER): detached workloads and
    restored processes re-parent to it, and :meth:`settle` reaps them.
    """

    name = "local"

    def __init__(self, base: Optional[str] = None, time_scale: float = 1.0):
        self._tmp = None if base else tempfile.mkdtemp(prefix="crucible-local-")
        self.base = base or self._tmp
        self.scripts = str(REPO / "harness")
        self.python = sys.executable
        self.time_scale = time_scale
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise HarnessError(f"prctl(PR_SET_CHILD_SUBREAPER): errno {ctypes.get_errno()}")
        self.env = dict(os.environ, PYTHONPATH=str(REPO))
        # vm/programs/*.c built for this host (tests/test_programs_local.py)
        self.programs_dir = os.environ.get("CRUCIBLE_PROGRAMS_DIR", "")
        self.kernel = os.uname().release
        self._held = -1     # a scenario's hold on the host settings it may widen (hostsysctl.py)

    def scenario_begins(self) -> None:
        from . import hostsysctl
        if self._held < 0:
            self._held = hostsysctl.hold()

    def run(self, argv: Sequence[str], timeout: float, step: str = "") -> RunResult:
        t0 = time.monotonic()
        try:
            # close_fds: the host's shells leak pipes (fd 200+) that a target
            # would inherit and the engine would rightly refuse.
            p = subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=timeout, close_fds=True, env=self.env, text=True)
        except subprocess.TimeoutExpired as e:
            self.settle(())
            raise StepTimeout(argv, timeout, step=step, detail=_text(e.stderr)) from None
        finally:
            self._reap_zombies()
        return RunResult(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)

    def put_bytes(self, data: bytes, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def get_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def fresh_file(self, data: bytes, path: str, clear: str) -> None:
        shutil.rmtree(clear, ignore_errors=True)
        self.put_bytes(data, path)

    def ckpt_argv(self) -> List[str]:
        return [self.python, "-m", "engine"]

    def settle(self, pids: Sequence[int]) -> None:
        # Gone, not just dead: a zombie whose parent is not this process (a
        # shell job's keeper reaps its job within half a second) still holds
        # its PID, and a same-PID restore would be refused pid-in-use.
        deadline = time.monotonic() + 3
        while True:
            self._reap_zombies()
            if all(_state(p) is None for p in pids) or time.monotonic() > deadline:
                return
            time.sleep(0.01)

    def cleanup(self, pids: Sequence[int]) -> None:
        from . import workload
        # the PIDs the run knows of, and any workload of this target it does not
        pids = list(pids) + workload.workloads_under(self.base)
        workload.kill_workloads(pids)
        from . import program
        pids += program.kill_programs(self.base)    # a program and its tree (by their environment)
        self.settle(pids)
        _remove_left_segments(pids)
        if self._held >= 0:     # the workload is gone: what it widened goes back (the last holder)
            from . import hostsysctl
            fd, self._held = self._held, -1
            hostsysctl.release(fd)

    def close(self) -> None:
        if self._held >= 0:
            from . import hostsysctl
            fd, self._held = self._held, -1
            hostsysctl.release(fd)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @staticmethod
    def _reap_zombies() -> None:
        """waitpid each *zombie* child: live ones are left alone, and so are
        children a subprocess.Popen still owns (none outlive run())."""
        me = os.getpid()
        try:
            tids = os.listdir(f"/proc/{me}/task")
        except OSError:
            return
        for tid in tids:
            try:
                with open(f"/proc/{me}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for pid in kids:
                if _state(pid) == "Z":
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass


def _remove_left_segments(pids: Sequence[int]) -> None:
    """System V shared memory segments a scenario's processes left behind
    on the host: attached by none, last attached or detached by one of
    `pids`. A guest's go with its snapshot; the host's would outlive the
    run (a workload's segment it never removed, or one an engine brought
    back without its IPC_RMID: the keep-sysv-shm mutant)."""
    mine = set(pids)
    if not mine:
        return
    try:
        with open("/proc/sysvipc/shm") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for row in rows:
        cols = row.split()
        try:
            shmid, lpid, nattch = int(cols[1]), int(cols[5]), int(cols[6])
        except (IndexError, ValueError):
            continue
        if nattch == 0 and lpid in mine:
            libc.shmctl(shmid, 0, None)         # IPC_RMID: gone now, none attached


def _state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


#: what :meth:`GuestTarget.zero_free_memory` leaves free (KiB)
ZERO_FREE_MARGIN_KB = 24 << 10
ZERO_FREE_CODE = """
import mmap, sys
free = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemFree:"))
n = (free - int(sys.argv[1])) // 4 * 4096
if n > 0:
    mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0x8000)).close()
"""


def settle_script(pids: Sequence[int], seconds: float) -> str:
    """A guest shell line that waits until each of ``pids`` is gone (a
    zombie still holds its PID: a same-PID restore would find it taken), at
    most ``seconds`` in all (then it gives up quietly: the caller looks at
    the PID itself)."""
    n = max(1, int(seconds + 0.999))
    return (f"end=$(( $(date +%s) + {n} )); for p in {' '.join(str(int(p)) for p in pids)}; do "
            "while [ -e /proc/$p ]; do "
            "[ $(date +%s) -ge $end ] && exit 0; sleep 0.05; done; done")


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


#: harness/targets.py GuestTarget._warm_digests: $1 the guest's python3, the rest ckpt's argv.
WARM_DIGESTS = r"""
py=$1; shift
d=$(mktemp -d /var/tmp/crucible-warm.XXXXXX) || exit 1
setsid "$py" -S -c '
import glob, importlib, os, sys, time
for f in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "lib-dynload", "*.so"))):
    try:
        importlib.import_module(os.path.basename(f).split(".")[0])
    except BaseException:
        pass
open(sys.argv[1], "w").close()
time.sleep(600)
' "$d/ready" </dev/null >/dev/null 2>&1 &
pid=$!
n=0
while [ ! -e "$d/ready" ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n + 1)); done
"$@" dump --leave-running -t $pid -D "$d/img" >/dev/null; rc=$?
kill -9 $pid; wait $pid 2>/dev/null
rm -rf "$d"
exit $rc
"""


class GuestTarget(Target):
    """Runs the steps in a :class:`vm.Guest`: through the resident agent
    (harness/agent.py, over a virtio-serial port) once :meth:`start_agent`
    ran, over SSH before that or when the agent cannot start (the engine
    installed as ``ckpt``, the guest files under /opt/crucible/harness)."""

    name = "guest"
    can_migrate = True

    def __init__(self, guest, time_scale: float = 1.0):
        self.guest = guest
        self.name = getattr(guest, "name", "guest")
        self.time_scale = time_scale
        self.python = "/usr/bin/python3"
        self.agent = None                   # an AgentLink once start_agent() ran
        self.agent_note = ""                # why there is none
        self.warm = False                   # ckpt commands go to the agent's warm engine
        self.warm_note = ""                 # why they do not
        self.digests_note = ""              # why ckpt's digest cache is cold in the snapshot
        self.lost = ""                      # why this guest must be replaced ("" = fine)
        self.pyc_compiled = 0               # sources install() had the guest compile (no cached bytecode)
        self.guest_python = ""              # the guest's python3 (harness/guestinstall.py version_line)
        self.digests_seeded = False         # ckpt's digest cache came from an earlier guest of this image

    def install(self, engine_dir: Path) -> None:
        """Copy the engine (``engine_dir``, with the ``ckpt`` wrapper) and the
        harness's guest files in and have them all byte-compiled, in one SSH
        command, with the bytecode this guest's python3 made of the same
        sources before (harness/guestinstall.py); what it compiles now is
        kept for next time."""
        from vm.paths import cache_dir
        from vm.recipe import CKPT_WRAPPER_FAST
        from . import guestinstall as gi
        t = 60 * self.time_scale
        assert self.scripts == f"{gi.ROOT}/harness"
        self.guest_python = self.guest.run(gi.version_line(self.python), timeout=t, check=True).stdout
        cache = gi.PycCache.for_guest(cache_dir() / "pyc", self.guest_python)
        b = gi.bundle(Path(engine_dir), REPO / "harness", guest_files() + ["agent.py"], CKPT_WRAPPER_FAST, cache)
        r = self.guest.run(f"mkdir -p {self.base} && {gi.install_line(b, self.python)}", timeout=5 * t, check=True,
                           stdin=b.data)
        self.kernel = r.stdout.strip().splitlines()[-1]
        self.pyc_compiled = len(b.missing)
        line = gi.learn_line(b)
        if line:
            from vm import VmError
            try:
                b.learn(self.guest.run_bytes(line, timeout=t))
            except (OSError, tarfile.TarError, VmError) as e:   # only a cache: the next run compiles again
                print(f"\ncrucible: guest {self.name}: bytecode not kept for next time: {e}")

    def start_agent(self) -> None:
        """Start the agent and warm it (before the golden snapshot, so every
        revert brings it back idle, its caches full). On failure the steps
        keep going over SSH and :attr:`agent_note` says why."""
        from .agent_client import AgentError, AgentLink, env_ok, start_line, warm_ok
        path = getattr(self.guest, "agent_socket", None)
        if not env_ok() or not path:
            self.agent_note = "agent off (CRUCIBLE_AGENT=0)" if path else "the guest has no agent port"
            return
        r = self.guest.run(start_line(self.python, self.scripts), timeout=300 * self.time_scale)
        if r.rc != 0:
            self.agent_note = f"agent did not start (exit {r.rc}): {(r.stderr or r.stdout)[-500:]}"
            return
        link = AgentLink(path, self.guest.alive, self.name)
        try:
            link.connect(time.monotonic() + 30)
            deadline = time.monotonic() + 60 * self.time_scale
            while True:     # its first replies may come before the port is open
                try:
                    link.ping(timeout=2, grace=0)
                    break
                except AgentError as e:
                    if e.kind != "timeout" or time.monotonic() > deadline:
                        raise
            # Warm what every scenario runs: the fork of a script, an engine start.
            link.run(self.script("workload.py") + ["pidstate", "1"], 120 * self.time_scale, script=True)
            link.run(self.ckpt_argv() + ["--help"], 120 * self.time_scale)
            self.warm_note = "off (CRUCIBLE_WARM_CKPT=0)" if not warm_ok() else link.zygote_note()
            if not self.warm_note:
                # the warm path once before the snapshot, so a broken one shows here, not per scenario
                r = link.run(self.ckpt_argv() + ["--version"], 120 * self.time_scale, warm=True)
                if not r.get("warm") or r["rc"] != 0:
                    self.warm_note = f"the warm engine failed: {r.get('cold_why') or r['stderr'][-300:]!r}"
            self.digests_note = self._warm_digests(link)
        except AgentError as e:
            link.close()
            self.agent_note = f"agent did not answer: {e.message}"
            return
        self.agent = link
        self.warm = not self.warm_note

    def zero_free_memory(self) -> str:
        """Right before the golden snapshot: fill the guest's free memory
        with zeros ("" or why not). The snapshot saves every page of guest
        RAM that is not all zeros, and every revert (loadvm) copies them
        all back; pages freed since boot (install, compiles, the agent's
        start) still held their old bytes. A process that maps nearly all
        free memory populated (the kernel hands it zeroed pages) and exits
        leaves them free and zero. The page cache and every process's
        memory are untouched: it stops :data:`ZERO_FREE_MARGIN_KB` short of
        the free total, above the kernel's reclaim watermarks."""
        r = self.run([self.python, "-c", ZERO_FREE_CODE, str(ZERO_FREE_MARGIN_KB)], 300 * self.time_scale,
                     step="golden")
        return "" if r.rc == 0 else f"free memory not zeroed (exit {r.rc}): {(r.stderr or r.stdout)[-300:]}"

    def facts(self) -> dict:
        """What :meth:`adopt` needs to take over a guest loaded from this
        one's golden snapshot (harness/goldencache.py META_FIELDS)."""
        return {"kernel": self.kernel, "guest_python": self.guest_python, "warm": self.warm,
                "warm_note": self.warm_note, "digests_note": self.digests_note,
                "digests_seeded": self.digests_seeded}

    def adopt(self, facts: dict) -> None:
        """Take over a guest just loaded from a kept golden snapshot
        (harness/goldencache.py): its agent is up and warm already (no
        install, no start); connect to it, check it answers as it did when
        kept, set the clock. Raises AgentError (the caller prepares a guest
        as before)."""
        from .agent_client import AgentError, AgentLink
        path = getattr(self.guest, "agent_socket", None)
        if not path:
            raise AgentError("broken", f"guest {self.name}: no agent port")
        link = AgentLink(path, self.guest.alive, self.name)
        try:
            link.connect(time.monotonic() + 30)
            deadline = time.monotonic() + 30 * self.time_scale
            while True:     # its port may open a moment after the load
                try:
                    link.ping(timeout=2, grace=0)
                    break
                except AgentError as e:
                    if e.kind != "timeout" or time.monotonic() > deadline:
                        raise
            note = link.zygote_note(timeout=10 * self.time_scale)
            if bool(facts["warm"]) != (not note):
                raise AgentError("agent", f"guest {self.name}: the kept agent's warm engine says {note!r}, "
                                          f"kept as {'on' if facts['warm'] else 'off'}")
            link.drain()
            link.set_clock(timeout=10 * self.time_scale)
        except AgentError:
            link.close()
            raise
        self.kernel, self.guest_python = facts["kernel"], facts["guest_python"]
        self.warm, self.warm_note = bool(facts["warm"]), facts["warm_note"]
        self.digests_note, self.digests_seeded = facts["digests_note"], bool(facts["digests_seeded"])
        self.agent = link

    def _warm_digests(self, link) -> str:
        """Fill ckpt's digest cache (engine/digestcache.py) before the golden
        snapshot: one ``ckpt dump --leave-running`` of a python3 that has
        loaded every extension module of the guest's Python (and so the
        libraries they link), the files any workload maps. Without it every
        scenario, reverted to an empty cache, hashed python3, libc and the
        rest again at its dump: ~0.3-0.4 s of a TCG guest's ~1.1 s dump.
        That is the state a machine's second dump is in, the one users
        live with; the hashing path and the cache's own rules are the host
        tier's (tests/test_digestcache.py). Best effort: a failure leaves the
        cache cold (slower, never wrong) and says why (""= warm)."""
        from vm.paths import cache_dir
        from . import digestseed
        from .agent_client import AgentError
        root, name, image = cache_dir() / "digests", "", getattr(self.guest, "image", None)
        try:   # the cache a guest of this image filled before (harness/digestseed.py)
            name = digestseed.key([image.rootfs, image.kernel, image.initrd], WARM_DIGESTS, self.python,
                                  self.guest_python)
        except (AttributeError, OSError):
            pass
        seed = digestseed.load(root, name) if name else None
        if seed is not None:
            r = link.run(["sh", "-c", digestseed.place_line()], 60 * self.time_scale, stdin=seed)
            if r["rc"] == 0:
                self.digests_seeded = True
                return ""
        r = link.run(["sh", "-c", WARM_DIGESTS, "warm-digests", self.python] + self.ckpt_argv(),
                     300 * self.time_scale)
        if r["rc"] != 0:
            return f"digest cache left cold (exit {r['rc']}): {r['stderr'][-300:].decode(errors='replace')}"
        if name:
            try:
                digestseed.store(root, name, link.get(digestseed.GUEST_PATH, timeout=60 * self.time_scale))
            except (AgentError, OSError) as e:     # only a cache: the next guest hashes again
                print(f"\ncrucible: guest {self.name}: digest cache not kept for next time: {e}")
        return ""

    def _lost(self, message: str, step: str, hung: bool = False) -> GuestLost:
        self.lost = message
        return GuestLost(message, step=step, detail=self.diagnostics(), hung=hung)

    def run(self, argv: Sequence[str], timeout: float, step: str = "") -> RunResult:
        from vm import VmError
        chaos.before_step(self, step)
        t0 = time.monotonic()
        argv = [str(a) for a in argv]
        if self.agent is not None:
            from .agent_client import AgentError
            script = len(argv) >= 2 and argv[0] == self.python and argv[1].startswith(self.scripts + "/")
            ckpt = argv[:1] == self.ckpt_argv()
            try:
                rep = self.agent.run(argv, timeout, script=script, warm=ckpt and self.warm)
            except AgentError as e:
                if e.kind == "agent":
                    raise HarnessError(e.message, step=step) from None
                raise self._lost(e.message, step, hung=e.kind == "timeout") from None
            if rep.get("timeout"):
                raise StepTimeout(argv, timeout, step=step, detail=_text(rep["stderr"])[-2000:])
            start = ""
            if ckpt:
                start = "warm" if rep.get("warm") else \
                    "exec" + (f": {rep.get('cold_why') or self.warm_note}" if self.warm_note or rep.get("cold_why") else "")
            return RunResult(rep["rc"], _text(rep["stdout"]), _text(rep["stderr"]), time.monotonic() - t0, start)
        try:
            r = self.guest.run(argv, timeout=timeout)
        except VmError as e:
            if getattr(e, "kind", "") == "timeout":
                raise StepTimeout(argv, timeout, step=step, detail=self.diagnostics()) from None
            if getattr(e, "kind", "") in ("died", "ssh"):
                raise self._lost(f"guest {self.name}: {getattr(e, 'message', e)}", step) from None
            raise HarnessError(f"guest {self.name}: {e.message if hasattr(e, 'message') else e}", step=step,
                               detail=self.diagnostics()) from None
        return RunResult(r.rc, _text(r.stdout), _text(r.stderr), time.monotonic() - t0)

    def put_bytes(self, data: bytes, path: str) -> None:
        if self.agent is not None:
            from .agent_client import AgentError
            try:
                return self.agent.put(data, path, timeout=120 * self.time_scale)
            except AgentError as e:
                if e.kind == "agent":
                    raise HarnessError(f"cannot write {path} in the guest: {e.message}") from None
                raise self._lost(e.message, "", hung=e.kind == "timeout") from None
        self.guest.put_bytes(data, path)

    def fresh_file(self, data: bytes, path: str, clear: str) -> None:
        if self.agent is None:
            return super().fresh_file(data, path, clear)
        from .agent_client import AgentError
        try:        # one request: the agent removes the tree and writes the file
            return self.agent.put(data, path, timeout=120 * self.time_scale, fresh=clear)
        except AgentError as e:
            if e.kind == "agent":
                raise HarnessError(f"cannot make {path} afresh in the guest: {e.message}", step="setup") from None
            raise self._lost(e.message, "setup", hung=e.kind == "timeout") from None

    def get_bytes(self, path: str) -> bytes:
        if self.agent is not None:
            from .agent_client import AgentError
            try:
                return self.agent.get(path, timeout=120 * self.time_scale)
            except AgentError as e:
                if e.kind == "agent":
                    raise HarnessError(f"cannot read {path} in the guest: {e.message}") from None
                raise self._lost(e.message, "", hung=e.kind == "timeout") from None
        return self.guest.get_bytes(path)

    def ckpt_argv(self) -> List[str]:
        return ["ckpt"]

    def settle(self, pids: Sequence[int]) -> None:
        """Wait (up to 3 s, scaled, as on the local target) for ``pids`` to be
        gone, reaped by the guest's init: a process that ends on its own - a leave-running
        original after its check - can still be in its interpreter's exit
        when the next step looks (the corpus under load judged three such
        originals "still running")."""
        pids = [int(p) for p in pids]
        if not pids:
            return
        if self.agent is not None:
            from .agent_client import AgentError
            try:        # the agent polls /proc itself: no shell loop of execs
                self.agent.gone(pids, 3 * self.time_scale, timeout=30 * self.time_scale)
                return
            except AgentError as e:
                if e.kind != "agent":
                    raise self._lost(e.message, "settle", hung=e.kind == "timeout") from None
                # an agent without the op: the shell loop
        self.run(["sh", "-c", settle_script(pids, 3 * self.time_scale)], timeout=30 * self.time_scale,
                 step="settle")

    def reset(self) -> None:
        """Revert to the golden snapshot. With the agent: no SSH reconnect,
        the agent sets the clock and must answer at once, or the guest is
        replaced (a stopped or wedged QEMU, a channel that will not come back)."""
        if self.lost and not self.guest.alive():
            raise HarnessError(f"guest {self.name} is gone: {self.lost}")
        # a QEMU that does not answer QMP (SIGSTOPped, wedged) cannot revert
        self.guest.status(timeout=10)
        if self.agent is None:
            self.guest.revert("golden")
        else:
            from .agent_client import AgentError
            self.guest.revert("golden", reconnect=False)
            try:
                if not self.agent.connected:          # the channel was dropped: the chardev takes a new one
                    self.agent.connect(time.monotonic() + 10)
                self.agent.drain()
                self.agent.set_clock(timeout=10 * self.time_scale)
            except AgentError as e:
                raise HarnessError(f"guest {self.name}: the agent did not come back after the revert: {e.message}") \
                    from None
        self.lost = ""

    def diagnostics(self) -> str:
        try:
            return self.guest.serial_tail(lines=40)
        except Exception as e:  # a dead guest still deserves a report
            return f"(serial tail unavailable: {e})"

    def health(self) -> str:
        """Why this guest cannot carry a scenario now ("" = it can): QEMU
        gone or stopped, or the root filesystem full. Asked after a step
        failed, to tell a broken guest from a broken scenario."""
        if self.lost:
            return self.lost
        if not self.guest.alive():
            return f"guest {self.name}: QEMU exited"
        # a write, not statfs: ext4 counts blocks free that no one may use
        probe = "head -c 65536 /dev/zero > /.crucible-health; r=$?; rm -f /.crucible-health; exit $r"
        try:
            r = self.run(["sh", "-c", probe], timeout=20 * self.time_scale, step="health")
        except HarnessError as e:
            return f"guest {self.name}: no answer to a health check: {e}"
        if r.rc != 0 and "No space" in r.stderr:
            self.lost = f"guest {self.name}: its root filesystem is full ({r.stderr.strip()})"
            return self.lost
        return ""
