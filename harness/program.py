"""A real program as the workload: start it, talk to it, judge it.

Runs in the guest (stdlib only, Python >= 3.9), as a script::

    python3 program.py spawn SPEC        # setup steps, start the program detached,
                                         # wait until ready, run the `before` steps;
                                         # print {pid, vars, output, tree, helpers}
    python3 program.py after SPEC READY  # after the restore (or a refused dump):
                                         # the outside checks, then the `after` steps;
                                         # print {ok, checks, ...}
    python3 program.py keeper SPEC MARK  # (internal) holds client connections
                                         # outside the dump, for `connect`/`send`
    python3 program.py kill ROOT         # SIGKILL every program started under ROOT

The program is what gets dumped (``dump -t PID``: its whole tree), not a
Python workload: nothing of ours runs inside it. So the proof that the
restored program *continued* comes from the interaction the scenario
declares: state created in the program's memory before the dump (a value
stored in a server, tokens a program drew and printed, a counter it
advances) that a fresh start would not have, read back after the restore.
``{token}`` in a step is a random value the harness draws per run, which a
restarted program cannot know; ``wait`` captures named groups from the
program's own output before the dump, and later steps name them.

Outside checks after the restore: the root PID runs, its tree (each member's
parent, group, session, name and thread ids) is the one recorded before the
dump (``stable: true``), and the output written before the dump is still
the beginning of the output (nothing rewritten).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

try:
    from . import world
except ImportError:  # pragma: no cover - in the guest, run as a script
    import world  # type: ignore[no-redef]

MARK = world.MARK
ENV_MARK = "CRUCIBLE_PROGRAM"     # in every program's environment: its scenario root
OUTPUT = "output"                 # in the work dir: the program's stdout and stderr (O_APPEND)
KEEPER_SOCK = "keeper.sock"       # in the control dir


class StepFailed(Exception):
    """A step could not do what it says, or its expectation failed
    (``recorded``: already in the checks)."""

    def __init__(self, message: str, recorded: bool = False):
        super().__init__(message)
        self.recorded = recorded


def write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.rename(tmp, path)


# -- substitution -----------------------------------------------------------------

_VAR = re.compile(r"\{([A-Za-z_]\w*)\}")


def subst(text: str, env: Dict[str, str], regex: bool = False) -> str:
    """``{name}`` -> its value (regex-escaped in a pattern); an unknown name is an error."""
    def one(m: "re.Match[str]") -> str:
        if m.group(1) not in env:
            raise StepFailed(f"{{{m.group(1)}}} is not defined (known: {', '.join(sorted(env))})")
        v = str(env[m.group(1)])
        return re.escape(v) if regex else v
    return _VAR.sub(one, text)


def variables(spec: dict, saved: Dict[str, str]) -> Dict[str, str]:
    p = spec["program"]
    return {"token": spec["token"], "work": spec["workdir"], "ctl": spec["ctldir"], "pid": str(spec.get("pid", "")),
            "programs": spec.get("programs_dir") or "", **{f"port{i}": str(x) for i, x in enumerate(p.get("ports") or [])},
            **saved}


def argv_of(entry: dict, env: Dict[str, str]) -> List[str]:
    if "sh" in entry:
        return ["/bin/sh", "-c", subst(entry["sh"], env)]
    return [subst(a, env) for a in entry["run" if "run" in entry else "argv"]]


# -- the process tree -------------------------------------------------------------

def _stat(pid: int) -> Optional[List[str]]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    return [comm] + text[text.rindex(")") + 2:].split()


def tree(root: int) -> Dict[str, Dict[str, Any]]:
    """Every live member of the tree rooted at ``root``: its parent, group,
    session, name and thread ids (zombies too: they are members)."""
    out: Dict[str, Dict[str, Any]] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        st = _stat(pid)
        if st is None:
            continue
        try:
            tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            tids = []
        out[str(pid)] = {"comm": st[0], "state": "Z" if st[1] in "ZX" else "live",
                         "ppid": int(st[2]) if pid != root else None,
                         "pgid": int(st[3]), "sid": int(st[4]), "tids": tids}
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
            except OSError:
                pass
    return out


def snapshots(members: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, str]]:
    """What /proc shows of every live member (harness/procstate.py), taken
    as it is: a program never sleeps in one call the way the workload does,
    and the harness compares only what a program does not change by itself."""
    try:
        from . import procstate
    except ImportError:  # pragma: no cover - in the guest, a top-level module beside this one
        import procstate  # type: ignore[no-redef]
    return {pid: procstate.snapshot(int(pid)) for pid, m in members.items() if m["state"] == "live"}


def compare_trees(before: Dict[str, Dict[str, Any]], after: Dict[str, Dict[str, Any]]) -> List[dict]:
    checks = []
    for pid, b in sorted(before.items(), key=lambda kv: int(kv[0])):
        a = after.get(pid)
        if a is None:
            checks.append(_check(f"tree: member {pid} ({b['comm']}) exists", "present", "gone", False))
            continue
        for key in ("comm", "state", "ppid", "pgid", "sid", "tids"):
            if key == "ppid" and b[key] is None:
                continue
            checks.append(_check(f"tree: member {pid} {key}", b[key], a[key], a[key] == b[key]))
    extra = sorted(set(after) - set(before), key=int)
    checks.append(_check("tree: no member appeared", [], extra, not extra))
    return checks


def _check(what: str, expected: Any, got: Any, ok: bool) -> dict:
    return {"fd": None, "what": what, "expected": expected, "got": got, "ok": bool(ok)}


# -- output -----------------------------------------------------------------------

def output_path(spec: dict) -> str:
    return os.path.join(spec["workdir"], OUTPUT)


def read_output(spec: dict) -> str:
    try:
        with open(output_path(spec), "rb") as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _compile(pattern: str, env: Dict[str, str]) -> "re.Pattern[str]":
    try:
        return re.compile(subst(pattern, env, regex=True), re.M)
    except re.error as e:
        raise StepFailed(f"bad pattern {pattern!r}: {e}") from None


# -- the keeper: client connections held outside the dump -----------------------------

def _keeper_spawn(req: dict, tty: int) -> dict:
    """The program as a job of the keeper's session: its own process group,
    the terminal's foreground one, the terminal on stdin/out/err."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setpgid(0, 0)
            old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.tcsetpgrp(tty, os.getpid())
            signal.signal(signal.SIGTTOU, old)
            for fd in (0, 1, 2):
                os.dup2(tty, fd)
            os.closerange(3, 65536)
            os.chdir(req["cwd"])
            os.execvpe(req["argv"][0], req["argv"], req["env"])
        finally:
            os._exit(127)
    return {"ok": True, "pid": pid}


def _keeper_run(req: dict, tty: int, master: int, out: int, ctldir: str) -> dict:
    """A command (the engine's restore) run in the keeper's session, with the
    terminal as its stdin, as a shell would run it; the screen is copied on.
    A `ckpt restore --tty` of a foreground job stays the job's parent until
    the job ends (engine/fds/tty.py wait_foreground), as a shell's `fg`:
    its answer is the JSON it prints first, and the keeper, like the shell,
    leaves it running and reaps it when it exits (keeper's loop)."""
    files = [os.path.join(ctldir, f"insession.{n}") for n in ("out", "err")]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setpgid(0, 0)        # in the foreground, as a shell runs a command
            old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.tcsetpgrp(tty, os.getpid())
            signal.signal(signal.SIGTTOU, old)
            os.dup2(tty, 0)
            for fd, name in zip((1, 2), files):
                os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.closerange(3, 65536)
            os.execvp(req["argv"][0], req["argv"])
        finally:
            os._exit(127)
    end = time.monotonic() + float(req.get("timeout", 120))
    status = None
    while time.monotonic() < end:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        if _waits_for_job(files[0]):
            texts = []
            for name in files:
                with open(name, errors="replace") as f:
                    texts.append(f.read())
            return {"ok": True, "rc": 0, "stdout": texts[0], "stderr": texts[1], "waiting": pid}
        r, _, _ = select.select([master], [], [], 0.05)
        if r:
            try:
                os.write(out, os.read(master, 65536))
            except OSError:
                pass
    if status is None:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    texts = []
    for name in files:
        with open(name, errors="replace") as f:
            texts.append(f.read())
    return {"ok": True, "rc": os.waitstatus_to_exitcode(status), "stdout": texts[0], "stderr": texts[1]}


def _waits_for_job(path: str) -> bool:
    """The command printed its whole --json result (one line, flushed before
    it waits) and it is a restore that waits for its foreground job."""
    try:
        with open(path, errors="replace") as f:
            line = f.readline()
    except OSError:
        return False
    if not line.endswith("\n"):
        return False
    try:
        doc = json.loads(line)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("ok") is True and isinstance(doc.get("result"), dict) \
        and bool(doc["result"].get("foreground"))


def keeper(spec_path: str, master: int = -1, tty_path: str = "") -> int:
    """Serve ``connect``/``send``/``type`` requests on the control dir's
    socket, one JSON line each; the connections live as long as this
    process. With ``master`` (a pty master, ``tty: outside``): what the
    terminal shows is appended to the program's output, and ``type``
    writes keys to it."""
    with open(spec_path) as f:
        spec = json.load(f)
    out = os.open(output_path(spec), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if master >= 0 else -1
    tty = -1
    if tty_path:    # the session's controlling terminal, as a shell has it
        tty = os.open(tty_path, os.O_RDWR)
        import fcntl
        import termios
        fcntl.ioctl(tty, termios.TIOCSCTTY, 0)
    path = os.path.join(spec["ctldir"], KEEPER_SOCK)
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    conns: Dict[str, socket.socket] = {}
    deadline = time.monotonic() + 3600      # never outlive a scenario by much
    os.write(1, b"ready\n")
    while time.monotonic() < deadline:
        while True:     # reap the jobs (a dumped one's PID must be free for its restore)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] <= 0:
                    break
            except ChildProcessError:
                break
        r, _, _ = select.select([srv] + ([master] if master >= 0 else []), [], [], 0.5)
        if master in r:
            try:
                data = os.read(master, 65536)
            except OSError:      # EIO: no slave open (between the dump and the restore)
                data = b""
                time.sleep(0.05)
            if data:
                os.write(out, data)
        if srv not in r:
            continue
        c, _ = srv.accept()
        with c:
            req = json.loads(c.makefile().readline())
            try:
                if req["op"] == "type":
                    os.write(master, req["data"].encode("latin-1"))
                    rep = {"ok": True}
                elif req["op"] == "spawn":
                    rep = _keeper_spawn(req, tty)
                elif req["op"] == "run":
                    rep = _keeper_run(req, tty, master, out, spec["ctldir"])
                else:
                    rep = _keeper_one(req, conns)
            except (OSError, StepFailed) as e:
                rep = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            c.sendall((json.dumps(rep) + "\n").encode())
    return 0


def _keeper_one(req: dict, conns: Dict[str, socket.socket]) -> dict:
    if req["op"] == "connect":
        fam = socket.AF_INET6 if ":" in req["host"] else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(req["timeout"])
        s.connect((req["host"], req["port"]))
        conns[req["name"]] = s
        return {"ok": True, "local": list(s.getsockname())[:2]}
    s = conns.get(req["name"])
    if s is None:
        raise StepFailed(f"no connection named {req['name']!r}")
    if req.get("data"):
        s.sendall(req["data"].encode("latin-1"))
    got = b""
    pat = re.compile(req["expect"], re.M | re.S) if req.get("expect") else None
    end = time.monotonic() + req["timeout"]
    while pat is not None and not pat.search(got.decode("latin-1")):
        left = end - time.monotonic()
        if left <= 0:
            return {"ok": False, "error": "no matching reply in time", "got": got.decode("latin-1")[-500:]}
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            return {"ok": False, "error": "the server closed the connection", "got": got.decode("latin-1")[-500:]}
        got += chunk
    return {"ok": True, "got": got.decode("latin-1")[-2000:]}


def ask_keeper(spec: dict, req: dict, timeout: float) -> dict:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(timeout + 10)
    try:
        c.connect(os.path.join(spec["ctldir"], KEEPER_SOCK))
        c.sendall((json.dumps(req) + "\n").encode())
        return json.loads(c.makefile().readline() or "{}")
    except (OSError, ValueError) as e:
        raise StepFailed(f"the connection keeper did not answer: {e}") from None
    finally:
        c.close()


def start_keeper(spec_path: str, spec: dict, master: int = -1, tty: str = "") -> int:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(w, 1)
            os.dup2(null, 2)
            if master >= 0:
                os.dup2(master, 3)
            os.closerange(4 if master >= 0 else 3, 65536)
            os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), "keeper", spec_path,
                                      "3" if master >= 0 else "-1", tty, MARK])
        finally:
            os._exit(127)
    os.close(w)
    ready = select.select([r], [], [], 30)[0] and os.read(r, 16)
    os.close(r)
    if not ready:
        raise StepFailed("the connection keeper did not start")
    return pid


# -- steps ------------------------------------------------------------------------

class Steps:
    """Runs one list of steps; ``saved`` collects captures (``wait``), ``checks`` results."""

    def __init__(self, spec: dict, spec_path: str, saved: Dict[str, str], pid: int):
        self.spec, self.spec_path, self.saved, self.pid = spec, spec_path, saved, pid
        self.checks: List[dict] = []
        self.helpers: List[int] = []
        self.marks: Dict[str, int] = dict(saved.get("_marks") or {})  # type: ignore[arg-type]
        #: every wait ends by then, so a program that never answers is judged, not timed out
        self.deadline = time.monotonic() + float(spec.get("steps_budget") or 1e9)

    def budget(self, a: Any) -> float:
        """A step's own timeout (30 s by default), within what is left of the phase's."""
        own = float(a.get("timeout", 30)) if isinstance(a, dict) else 30.0
        return max(0.1, min(own, self.deadline - time.monotonic()))

    @property
    def env(self) -> Dict[str, str]:
        return variables(self.spec, {k: v for k, v in self.saved.items() if not k.startswith("_")})

    def run(self, steps: List[dict], phase: str) -> None:
        for i, step in enumerate(steps):
            (name, args), = step.items()
            try:
                getattr(self, "do_" + name.replace("-", "_"))(args, f"{phase}[{i}] {name}")
            except StepFailed as e:
                if not e.recorded:
                    self.checks.append(_check(f"{phase}[{i}] {name}", "the step succeeds", str(e), False))
                return

    def ok(self, what: str, expected: Any, got: Any, ok: bool) -> None:
        self.checks.append(_check(what, expected, got, ok))
        if not ok:
            raise StepFailed(f"expected {expected!r}, got {got!r}", recorded=True)

    def do_sleep(self, seconds: float, what: str) -> None:
        time.sleep(float(seconds))

    def do_write(self, a: dict, what: str) -> None:
        path = os.path.join(self.spec["workdir"], a["path"])
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | (os.O_APPEND if a.get("append") else 0))
        except OSError as e:
            raise StepFailed(f"cannot open {a['path']}: {e}") from None
        try:
            os.write(fd, subst(a["data"], self.env).encode())
        finally:
            os.close(fd)

    def do_exec(self, a: dict, what: str) -> None:
        argv = argv_of(a, self.env)
        try:
            r = subprocess.run(argv, cwd=self.spec["workdir"], input=subst(a.get("stdin", ""), self.env).encode(),
                               capture_output=True, timeout=self.budget(a), close_fds=True)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"{argv} did not finish in {a.get('timeout', 30)} s") from None
        except OSError as e:
            raise StepFailed(f"{argv}: {e}") from None
        # what a user sees: both streams (an error message is often the point)
        out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
        want = a.get("rc", 0)
        self.ok(f"{what}: {' '.join(argv)[:120]}: exit status", want, r.returncode,
                r.returncode in (want if isinstance(want, list) else [want]))
        if "expect" in a:
            pat = _compile(a["expect"], self.env)
            m = pat.search(out)
            self.ok(f"{what}: {' '.join(argv)[:120]}: output", a["expect"],
                    out[-400:], bool(m))
            self._save(m)

    def _save(self, m: Optional["re.Match[str]"]) -> None:
        if m is not None:
            for k, v in m.groupdict().items():
                if v is not None:
                    self.saved[k] = v

    def do_wait(self, a: dict, what: str) -> None:
        """Until the program's output holds a line matching each pattern
        (named groups are saved); ``since: dump`` looks only at what was
        written after the output the harness saw before the dump."""
        pats = [_compile(p, self.env) for p in (a["lines"] if "lines" in a else [a["output"]])]
        start = self.marks.get("dump", 0) if a.get("since") == "dump" else 0
        end = time.monotonic() + self.budget(a)
        while True:
            text = read_output(self.spec)[start:]
            found = [p.search(text) for p in pats]
            if all(found):
                for m in found:
                    self._save(m)
                for p in pats:
                    self.checks.append(_check(f"{what}: {p.pattern[:100]}", "a matching line", "found", True))
                return
            if time.monotonic() > end:
                missing = [p.pattern for p, m in zip(pats, found) if not m]
                self.ok(f"{what}: output lines", missing, text[-600:], False)
            time.sleep(0.05)

    def do_sequence(self, a: dict, what: str) -> None:
        """The numbers in the output lines matching ``output`` (group ``n``)
        run from ``start`` by one, none missing or repeated, reach ``reach``,
        and (after the restore) go at least ``advance`` beyond the highest
        written before the dump."""
        pat = _compile(a["output"], self.env)
        end = time.monotonic() + self.budget(a)
        floor = 0
        if self.spec.get("phase") == "after":
            # the highest number written before the dump: in the output as
            # the harness found it once the original was gone (or, after a
            # refused dump, what the before steps saw)
            upto = self.marks.get("dump")
            seen = [int(m.group("n")) for m in pat.finditer(read_output(self.spec)[:upto])] if upto else []
            floor = max(seen) if seen else int(self.saved.get("_seq_" + a["name"], 0))
        while True:
            nums = [int(m.group("n")) for m in pat.finditer(read_output(self.spec))]
            want_top = max(floor + int(a.get("advance", 1)), int(a.get("reach", 0)))
            if nums and max(nums) >= want_top:
                break
            if time.monotonic() > end:
                break
            time.sleep(0.05)
        first = int(a.get("start", 1))
        exact = nums == list(range(first, first + len(nums)))
        bad = next((f"{x} after {y}" for y, x in zip([first - 1] + nums, nums) if x != y + 1), "")
        self.ok(f"{what} {a['name']}: consecutive from {first}, none missing or repeated",
                f"{first}..", bad or f"{first}..{nums[-1] if nums else '-'}", exact)
        top = max(nums) if nums else 0
        want_top = max(floor + int(a.get("advance", 1)), int(a.get("reach", 0)))
        self.ok(f"{what} {a['name']}: reaches", f">= {want_top}", top, top >= want_top)
        self.saved["_seq_" + a["name"]] = str(top)

    def do_type(self, a: dict, what: str) -> None:
        """Keys typed on the terminal (``tty: outside``: into its master, held outside the dump)."""
        rep = ask_keeper(self.spec, {"op": "type", "data": subst(a["data"], self.env)}, 10)
        self.ok(f"{what}: {a['data'][:40]!r}", "typed", rep.get("error") or "typed", bool(rep.get("ok")))

    def do_connect(self, a: dict, what: str) -> None:
        if not self.helpers and not os.path.exists(os.path.join(self.spec["ctldir"], KEEPER_SOCK)):
            self.helpers.append(start_keeper(self.spec_path, self.spec))
        t = self.budget(a)
        rep = ask_keeper(self.spec, {"op": "connect", "name": a["name"], "host": a.get("host", "127.0.0.1"),
                                     "port": int(subst(str(a["tcp"]), self.env)), "timeout": t}, t)
        self.ok(f"{what} {a['name']} to port {a['tcp']}", "connected", rep.get("error") or "connected",
                bool(rep.get("ok")))

    def do_send(self, a: dict, what: str) -> None:
        t = self.budget(a)
        rep = ask_keeper(self.spec, {"op": "send", "name": a["conn"], "data": subst(a.get("data", ""), self.env),
                                     "expect": subst(a["expect"], self.env, regex=True) if "expect" in a else "",
                                     "timeout": t}, t)
        self.ok(f"{what} on {a['conn']}: {a.get('data', '')[:60]!r}", a.get("expect", "sent"),
                rep.get("got") if rep.get("ok") else f"{rep.get('error')}: {rep.get('got', '')!r}",
                bool(rep.get("ok")))
        if rep.get("ok") and "expect" in a:
            self._save(re.search(subst(a["expect"], self.env, regex=True), rep.get("got", ""), re.M | re.S))


# -- spawn / after ------------------------------------------------------------------

def _child_env(spec: dict) -> Dict[str, str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": spec["workdir"], "TERM": "dumb", ENV_MARK: os.path.dirname(spec["workdir"])}
    env.update({k: str(v) for k, v in (spec["program"].get("env") or {}).items()})
    return env


def _ready(spec: dict, pid: int, env: Dict[str, str]) -> str:
    """'' once every readiness condition holds; else why not yet."""
    r = spec["program"].get("ready") or {}
    if "output" in r and not _compile(r["output"], env).search(read_output(spec)):
        return f"no output line matching {r['output']!r}"
    if "file" in r and not os.path.exists(os.path.join(spec["workdir"], subst(r["file"], env))):
        return f"no file {r['file']}"
    if "tcp" in r:
        s = socket.socket()
        s.settimeout(1)
        try:
            s.connect(("127.0.0.1", int(subst(str(r["tcp"]), env))))
        except OSError as e:
            return f"port {r['tcp']} does not accept ({e})"
        finally:
            s.close()
    return ""


def spawn(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    p = spec["program"]
    try:
        world.apply_phase(spec, "setup")
    except world.WorldError as e:
        print(json.dumps({"error": f"setup step failed: {e}", "step": "setup"}))
        return 1
    saved: Dict[str, str] = {}
    env = variables(spec, saved)
    for fifo in p.get("fifos") or []:
        os.mkfifo(os.path.join(spec["workdir"], fifo), 0o600)
    argv = argv_of(p, env)
    out = os.open(output_path(spec), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    # stdin: /dev/null, or a fifo of the work dir opened read-write (the
    # program never sees EOF; `write` steps feed it)
    stdin = os.path.join(spec["workdir"], p["stdin"]) if p.get("stdin") else os.devnull
    helpers: List[int] = []
    tty = ""
    if p.get("tty") == "outside":
        # A terminal whose master a process outside the dump holds (a
        # terminal emulator, and the shell whose session it is: the keeper);
        # the program is a job of that session, in the foreground.
        master, slave = os.openpty()
        import fcntl
        import struct
        import termios
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        tty = os.ttyname(slave)
        os.close(slave)
        helpers.append(start_keeper(spec_path, spec, master, tty))
        os.close(master)
        os.close(out)
        rep = ask_keeper(spec, {"op": "spawn", "argv": argv, "env": _child_env(spec), "cwd": spec["workdir"]}, 30)
        if not rep.get("ok"):
            print(json.dumps({"error": f"the keeper could not start the program: {rep.get('error')}",
                              "step": "ready", "helpers": helpers}))
            return 1
        child = rep["pid"]
    else:
        child = os.fork()
    if child == 0:  # pragma: no cover - child
        try:
            os.setsid()
            null = os.open(stdin, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.closerange(3, 65536)
            os.chdir(spec["workdir"])
            os.execvpe(argv[0], argv, _child_env(spec))
        finally:
            os._exit(127)
    if not tty:
        os.close(out)
    res: Dict[str, Any] = {"pid": child, "argv": argv, "helpers": helpers}
    if tty:
        res["tty"] = tty        # where the restore reopens the terminal (restore --tty)
    spec["pid"] = child
    deadline = time.monotonic() + float(spec.get("ready_timeout", 30))
    why = "not started"
    while time.monotonic() < deadline:
        pid, status = os.waitpid(child, os.WNOHANG) if not tty else (0, 0)   # (the keeper's child)
        if pid or (tty and not world.pidstate(child)["exists"]):
            res.update(error=f"the program exited before it was ready (status {status:#x}): "
                             f"{read_output(spec)[-1500:]}", step="ready")
            print(json.dumps(res))
            return 1
        why = _ready(spec, child, env)
        if not why:
            break
        time.sleep(0.05)
    else:
        res.update(error=f"the program was not ready in time: {why}; output: {read_output(spec)[-1500:]}",
                   step="ready")
        print(json.dumps(res))
        return 1
    time.sleep(float((p.get("ready") or {}).get("settle", 0)))
    spec["phase"] = "before"
    steps = Steps(spec, spec_path, saved, child)
    steps.helpers = helpers
    steps.run(p.get("before") or [], "before")
    res["helpers"] = steps.helpers
    try:
        world.apply_phase(spec, "before_dump")
    except world.WorldError as e:
        res.update(error=f"before_dump step failed: {e}", step="before_dump")
    bad = [c for c in steps.checks if not c["ok"]]
    if bad:
        res.update(error="a before step failed: " + "; ".join(f"{c['what']}: expected {c['expected']!r}, "
                                                              f"got {c['got']!r}" for c in bad), step="ready")
    # What the harness keeps (and gives back to `after`): captures, and the
    # output and tree as they were right before the dump.
    text = read_output(spec).encode()
    # replaced by the output's length once the original is gone (programrun)
    saved["_marks"] = {"dump": len(text.decode(errors="replace"))}  # type: ignore[assignment]
    members = tree(child)
    res.update(vars=saved, output={"bytes": len(text), "sha256": hashlib.sha256(text).hexdigest()},
               tree=members, snaps=snapshots(members))
    print(json.dumps(res))
    return 1 if "error" in res else 0


def after(spec_path: str, ready_path: str) -> int:
    """The outside checks, then the `after` steps; prints the verdict."""
    with open(spec_path) as f:
        spec = json.load(f)
    with open(ready_path) as f:
        ready = json.load(f)
    p, pid = spec["program"], int(ready["pid"])
    spec["pid"] = pid
    checks: List[dict] = []
    now = tree(pid)
    alive = str(pid) in now and now[str(pid)]["state"] == "live"
    checks.append(_check("proof: the program runs under its pid", f"pid {pid}", "running" if alive else "gone", alive))
    if alive and p.get("stable", True):
        checks += compare_trees(ready["tree"], now)
    # before the after steps: the harness diffs them with the dump's (statediff.program_view)
    snaps = snapshots(now) if alive else {}
    o = ready["output"]
    with open(output_path(spec), "rb") as f:
        head = f.read(o["bytes"])
    checks.append(_check("output: what was written before the dump is unchanged",
                         o["sha256"], hashlib.sha256(head).hexdigest(),
                         hashlib.sha256(head).hexdigest() == o["sha256"]))
    spec["phase"] = "after"
    steps = Steps(spec, spec_path, dict(ready.get("vars") or {}), pid)
    if alive:
        steps.run(p.get("after") or [], "after")
    checks += steps.checks
    ok = all(c["ok"] for c in checks)
    print(json.dumps({"ok": ok, "checks": checks, "output_tail": read_output(spec)[-1500:], "snaps": snaps}))
    return 0


def programs_under(root: str) -> List[int]:
    """Every process whose environment names a scenario under ``root`` (a
    program, its children, or a fresh start of it by a faking engine)."""
    out = []
    needle = f"{ENV_MARK}={root}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(needle) for e in env):
            out.append(int(name))
    return out


def kill_programs(root: str, seconds: float = 5.0) -> List[int]:
    """SIGKILL them all, again until none is left: a member may fork
    between the look and the kill (a shell loop's next `sleep`)."""
    killed: List[int] = []
    end = time.monotonic() + seconds
    while True:
        pids = [p for p in programs_under(root) if world.pidstate(p)["exists"]]
        if not pids or time.monotonic() > end:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def main(argv: List[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "spawn" and len(argv) == 2:
        return spawn(argv[1])
    if cmd == "after" and len(argv) == 3:
        return after(argv[1], argv[2])
    if cmd == "keeper" and len(argv) >= 4:
        return keeper(argv[1], int(argv[2]), argv[3])
    if cmd == "insession" and len(argv) >= 4 and argv[3] == "--":
        # insession SPEC SECONDS -- ARGV: run ARGV in the keeper's session (restore --tty)
        with open(argv[1]) as f:
            spec = json.load(f)
        rep = ask_keeper(spec, {"op": "run", "argv": argv[4:], "timeout": float(argv[2])}, float(argv[2]))
        if not rep.get("ok"):
            print(rep.get("error"), file=sys.stderr)
            return 2
        sys.stdout.write(rep["stdout"])
        sys.stderr.write(rep["stderr"])
        return rep["rc"]
    if cmd == "kill" and len(argv) == 2:
        print(json.dumps(kill_programs(argv[1])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
