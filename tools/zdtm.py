"""CRIU's own C/R tests (zdtm static) run against ckpt: tests written
elsewhere, by the people who know what C/R breaks, each checking its own
state after the restore and printing PASS or FAIL.

Each test is built from a CRIU source tree (`--src`, its test/zdtm; by
default Debian 13's CRIU 4.1.1 source, fetched once and checked), started the way zdtm.py's host flavour
starts it (the binary with --pidfile/--outfile and the per-test arguments of
static/Makefile), and then:

  baseline   a second copy run with no C/R, stopped with SIGTERM: a test
             that does not PASS on this machine says nothing about ckpt;
  dump       ckpt dump -t PID -D IMG (the target is killed by the dump);
  restore    ckpt restore -D IMG, the same PID;
  verdict    SIGTERM, the test checks what it set up and writes PASS or FAIL.

Outcomes: `pass` (restored, and the test found everything as it left it),
`refused` (ckpt refused the dump or the restore, with a reason code: the
safe answer), `FAIL` (restored, and the test found something wrong: a
silent corruption), `lost` (restored, and the process died or never
answered), `error` (ckpt failed without a reason code), `skipped` (not a
host-flavour test, marked noauto, no PASS without C/R, not built).

usage: tools/zdtm.py [--src CRIU_SRC] [--only NAME,...] [--work DIR]
                     [--out FILE.json] [--md FILE.md] [--ckpt CMD] [-j N]
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import ctypes
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTS = ("TST_NOFILE", "TST_FILE", "TST_DIR", "TST_DIR_FILE")
# Tests that share something machine-wide run one at a time, in a lane of
# their own: the socket tests bind fixed ports (8880-8886), and the cgroup
# tests make and remove cgroups in the one named v1 hierarchy "zdtmtst"
# (cgroup00 and cgroup_yard both use subcg00/subsubcg there)
# (two at once: one's cleanup removed the other's cgroup between its dump
# and its restore, which ckpt rightly refused as gone).
NET = re.compile(r"sock|tcp|udp|sk-|net|packet|icmp")
CGROUP = re.compile(r"^cgroup")
SETTLE = 0.1          # seconds a test runs on before a step (after it said it is ready)
WAIT = 20.0           # seconds for a test to get ready, or to answer SIGTERM


def _lists(makefile: str) -> dict:
    """{test name: its list} from static/Makefile's TST_* variables (the
    unconditional parts: the arch-conditional ones are left out)."""
    text = re.sub(r"#[^\n]*", "", open(makefile).read()).replace("\\\n", " ")
    out = {}
    depth = 0
    for line in text.splitlines():
        word = line.split()[0] if line.split() else ""
        if word.startswith("ifeq") or word.startswith("ifneq") or word.startswith("ifdef"):
            depth += 1
        elif word == "endif":
            depth -= 1
        m = re.match(r"^(TST_NOFILE|TST_FILE|TST_DIR|TST_DIR_FILE|TST)\s*[:+]?=(.*)$", line)
        if m and depth == 0:
            for name in m.group(2).split():
                if not name.startswith("$("):     # TST: the lists, and tests with a rule of their own
                    out[name] = m.group(1)
    return out


def _special_args(makefile: str) -> dict:
    """{test: argument string} for the tests static/Makefile starts with
    their own rule (env00 --envname=..., umask00 --mask=...)."""
    out = {}
    lines = open(makefile).read().splitlines()
    for i, line in enumerate(lines[:-1]):
        m = re.match(r"^([\w.-]+)\.pid:\s+([\w.-]+)\s*$", line)
        if m and m.group(1) == m.group(2) and lines[i + 1].startswith("\t$(<D)/$(<F)"):
            out[m.group(1)] = lines[i + 1].split("$(<D)/$(<F)", 1)[1].strip()
    return out


def _args(name: str, kind: str, special: dict) -> list:
    if name in special:
        text = special[name].replace("$@", f"{name}.pid").replace("$<", name)
        return shlex.split(text)
    args = [f"--pidfile={name}.pid", f"--outfile={name}.out"]
    if kind == "TST_FILE":
        args.append(f"--filename={name}.test")
    elif kind == "TST_DIR":
        args.append(f"--dirname={name}.test")
    elif kind == "TST_DIR_FILE":
        args += [f"--dirname={name}.dir.test", f"--filename={name}.test"]
    return args


def _desc(static: str, name: str) -> dict:
    try:
        with open(os.path.join(static, name + ".desc")) as f:
            d = ast.literal_eval(f.read().strip() or "{}")
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError, SyntaxError):
        return {}


def _why_skipped(desc: dict):
    flavor = str(desc.get("flavor", "h ns uns")).split()
    flags = str(desc.get("flags", "")).split()
    if "h" not in flavor:
        return f"not a host-flavour test (flavour {' '.join(flavor)})"
    if "noauto" in flags:
        return "marked noauto"
    if desc.get("arch") and os.uname().machine not in str(desc["arch"]).split():
        return f"for {desc['arch']}"
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return


def _our_zombies() -> list:
    me, out = str(os.getpid()), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and fields[1] == me:
                out.append(int(name))
    return out


def _gone(pid: int, seconds: float = 10) -> bool:
    """pid and the rest of its dumped tree dead and reaped: we are the
    tests' subreaper, so each is our zombie until reaped, and its pid not
    free for the restore."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        _reap()
        if not os.path.exists(f"/proc/{pid}") and not _our_zombies():
            return True
        time.sleep(0.005)
    return False


def _wait(pred, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        _reap()
        time.sleep(0.01)
    return pred()


def _env(desc: dict) -> dict:
    """The environment zdtm.py gives a test: a test not flagged suid runs
    under CRIU's test ids (lib/test.c changes to them), so its files and
    its credentials are not root's."""
    env = {"TMPDIR": os.environ.get("TMPDIR", "/tmp"), "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    if "suid" not in str(desc.get("flags", "")).split():
        env.update(ZDTM_UID="18943", ZDTM_GID="58467", ZDTM_GROUPS="27495 48244")
    return env


def _start(binary: str, args: list, cwd: str, env: dict):
    """Run the test's launcher; it forks the test and exits once the test
    is running. The test's pid (from its pidfile) or an error text."""
    pidfile = os.path.join(cwd, args[0].split("=", 1)[1])
    os.chmod(cwd, 0o777)
    try:
        r = subprocess.run([binary] + args, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, close_fds=True, timeout=WAIT, start_new_session=True, env=env)
    except subprocess.TimeoutExpired:
        return None, "the test did not get ready"
    if r.returncode != 0:
        return None, f"the test did not start ({r.returncode}): {(r.stderr or r.stdout)[-300:]}"
    if not _wait(lambda: os.path.exists(pidfile), WAIT):
        return None, "no pidfile"
    return int(open(pidfile).read().split()[0]), None


def _stop(pid: int, outfile: str) -> tuple:
    """SIGTERM, then the test's own verdict: (PASS|FAIL|lost, its log tail)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "lost", "the process was gone before SIGTERM"
    if not _wait(lambda: not _alive(pid), WAIT):
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: not _alive(pid), 5)
        return "lost", "no answer to SIGTERM"
    _wait(lambda: os.path.exists(outfile), 2)
    text = ""
    for path in (outfile, outfile + ".inprogress"):
        if os.path.exists(path):
            text = open(path, errors="replace").read()
            break
    tail = "\n".join(text.strip().splitlines()[-6:])
    # lines are "TIME: PID: message"; the verdict is the message PASS or FAIL:...
    if re.search(r"\bPASS\s*$", text, re.M) and not re.search(r"\bFAIL\b", text):
        return "PASS", tail
    if re.search(r"\bFAIL\b", text):
        return "FAIL", tail
    return "lost", tail or "no output"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _ckpt(cmd: list, argv: list, timeout: float = 120):
    r = subprocess.run(cmd + argv + ["--json"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       close_fds=True, timeout=timeout)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = {}
    rc = r.returncode
    if rc == 0 and doc.get("ok") is False:      # what ckpt said wins over a status that could be lost
        rc = doc.get("exit") or 1
    return rc, doc, r.stderr


def _reasons(doc: dict) -> list:
    """The reason codes of a refusal (ckpt --json); [] for any other failure."""
    return sorted({ref.get("reason") for ref in doc.get("refusals") or [] if ref.get("reason")})


def _images(work: str) -> str:
    path = os.path.join(work, "images")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _children() -> list:
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def run_one(name: str, kind: str, static: str, special: dict, work: str, ckpt: list,
            baseline: bool = True) -> dict:
    """One test in a worker that is the subreaper of its tests: whatever of
    it is still there when it ends (a test that never got ready, a child
    that made itself a session of its own, a half-restored tree) is one of
    this worker's children then, and is killed and reaped by PID."""
    try:
        return _run_one(name, kind, static, special, work, ckpt, baseline)
    finally:
        for _ in range(3):
            left = _children()
            if not left:
                break
            for pid in left:
                _kill(pid)
            _gone(left[0], 5)


def _run_one(name: str, kind: str, static: str, special: dict, work: str, ckpt: list,
             baseline: bool = True) -> dict:
    desc = _desc(static, name)
    rec = {"test": name, "opts": desc.get("opts", ""), "flags": desc.get("flags", "")}
    why = _why_skipped(desc)
    binary = os.path.join(static, name)
    if why is None and not os.path.exists(binary):
        why = "not built"
    if why:
        return dict(rec, outcome="skipped", detail=why)
    args = _args(name, kind, special)
    outname = args[1].split("=", 1)[1]
    base = tempfile.mkdtemp(prefix=f"{name}-base-", dir=work)
    if baseline:        # no C/R: does the test PASS here at all?
        pid, err = _start(binary, args, base, _env(desc))
        if pid is None:
            return dict(rec, outcome="skipped", detail=f"without C/R: {err}")
        time.sleep(SETTLE)
        verdict, tail = _stop(pid, os.path.join(base, outname))
        if verdict != "PASS":
            return dict(rec, outcome="skipped", detail=f"no PASS without C/R ({verdict}): {tail[-200:]}")
    # with C/R
    d = tempfile.mkdtemp(prefix=f"{name}-", dir=work)
    pid, err = _start(binary, args, d, _env(desc))
    if pid is None:
        return dict(rec, outcome="skipped", detail=f"second start: {err}")
    time.sleep(SETTLE)
    # not in the test's directory: that one is world-writable (the test's
    # ids must write there), and ckpt refuses an image anyone could swap
    img = os.path.join(tempfile.mkdtemp(prefix=f"{name}-", dir=_images(work)), "img")
    t0 = time.monotonic()
    try:
        rc, doc, stderr = _ckpt(ckpt, ["dump", "-t", str(pid), "-D", img])
    except subprocess.TimeoutExpired:
        _kill(pid)
        return dict(rec, outcome="error", detail="ckpt dump timed out")
    rec["dump_s"] = round(time.monotonic() - t0, 3)
    dumped = f"dump said {json.dumps(doc)[:300]} {stderr.strip()[-200:]}"
    if rc != 0:
        reasons = _reasons(doc)
        alive = _alive(pid)
        if alive:
            after, tail = _stop(pid, os.path.join(d, outname))
        else:
            after, tail = "gone", ""
        if not reasons:
            return dict(rec, outcome="error", detail=f"dump failed ({rc}): {stderr.strip()[-300:]}")
        if after != "PASS":
            return dict(rec, outcome="FAIL", stage="refused dump",
                        detail=f"refused ({', '.join(reasons)}) but the target was harmed: {after} {tail[-200:]}")
        return dict(rec, outcome="refused", stage="dump", reasons=reasons, detail=stderr.strip()[-300:])
    _gone(pid)
    t0 = time.monotonic()
    try:
        rc, doc, stderr = _ckpt(ckpt, ["restore", "-D", img])
    except subprocess.TimeoutExpired:
        _kill(pid)
        return dict(rec, outcome="error", detail="ckpt restore timed out")
    rec["restore_s"] = round(time.monotonic() - t0, 3)
    if rc != 0:
        reasons = _reasons(doc)
        if _alive(pid):
            _kill(pid)
            return dict(rec, outcome="FAIL", stage="restore",
                        detail=f"restore failed ({rc}: {stderr.strip()[-300:]}) yet pid {pid} is alive; {dumped}")
        if not reasons:
            return dict(rec, outcome="error", stage="restore",
                        detail=f"restore failed ({rc}): {stderr.strip()[-300:]}; {dumped}")
        return dict(rec, outcome="refused", stage="restore", reasons=reasons, detail=stderr.strip()[-300:])
    time.sleep(SETTLE)
    verdict, tail = _stop(pid, os.path.join(d, outname))
    if verdict == "PASS":
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        return dict(rec, outcome="pass")
    return dict(rec, outcome=verdict if verdict == "FAIL" else "lost", detail=tail[-400:])


# CRIU's source as Debian 13 ships it (the same version as the guests' and
# the host comparison's criu), pinned: what is built and run is known.
SOURCE_URL = "http://deb.debian.org/debian/pool/main/c/criu/criu_4.1.1.orig.tar.xz"
SOURCE_SHA256 = "f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe"
# Not in root's home: tests not flagged suid run under CRIU's test ids, and
# some exec their own binary again.
DEFAULT_SRC = "/var/cache/crucible/criu-src-4.1.1"


def fetch(dest: str) -> str:
    """CRIU's source unpacked in dest (fetched once, its sha256 checked)."""
    if os.path.isdir(os.path.join(dest, "test", "zdtm", "static")):
        return dest
    import hashlib
    import tarfile
    import urllib.request
    os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".criu-src-", dir=os.path.dirname(dest))
    try:
        archive = os.path.join(tmp, "src.tar.xz")
        print(f"zdtm: fetching {SOURCE_URL}", file=sys.stderr, flush=True)
        with urllib.request.urlopen(SOURCE_URL, timeout=120) as r, open(archive, "wb") as f:
            shutil.copyfileobj(r, f)
        with open(archive, "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
        if got != SOURCE_SHA256:
            raise SystemExit(f"zdtm: {SOURCE_URL} has sha256 {got}, not the pinned {SOURCE_SHA256}")
        def members(t):
            # the tree holds a link to an absolute path (images/google/protobuf,
            # for protoc) that the safe extraction filter refuses; the tests need none
            for m in t:
                if not (m.issym() and os.path.isabs(m.linkname)):
                    yield m
        with tarfile.open(archive) as t:
            t.extractall(os.path.join(tmp, "x"), members=members(t), filter="data")
        (top,) = os.listdir(os.path.join(tmp, "x"))
        os.chmod(os.path.join(tmp, "x", top), 0o755)
        os.rename(os.path.join(tmp, "x", top), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build(src: str, names: list, jobs: int, suite: str = "static") -> None:
    zdtm = os.path.join(src, "test", "zdtm")
    subprocess.run(["make", "-s", "-C", os.path.join(zdtm, "lib"), f"-j{jobs}"], check=True,
                   stdout=subprocess.DEVNULL)
    # one make per test: a test that does not build (headers this machine
    # lacks) is skipped, not the run
    subprocess.run(["make", "-s", "-k", "-C", os.path.join(zdtm, suite), f"-j{jobs}"] + names,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)       # PR_SET_CHILD_SUBREAPER: the tests are reparented to us


def expectations(results: list) -> dict:
    """{test: "pass" | "refused: REASON,..."} of the tests that ended so
    (a FAIL is never written down as expected)."""
    out = {}
    for r in results:
        if r["outcome"] == "pass":
            out[r["test"]] = "pass"
        elif r["outcome"] == "refused":
            out[r["test"]] = outcome_text(r)
    return out


# A refusal that depends on what else runs on the machine: a fixed port
# still held (a TIME_WAIT of an earlier test) by what ckpt's restore would
# need. Safe, but not the engine's property: such an expectation is met by
# that refusal or by a pass.
BUSY = "address in use"
# Likewise: a bound unix datagram socket's queue is restored only while its
# one sender is the namespace's only unix datagram socket with messages
# charged to it; another test's queued datagrams, running beside, make it
# refuse (engine/fds/_unixdgram.py _queued).
CHARGED = "messages charged to them"
ENVIRONMENT = (BUSY, CHARGED)


def _environment(r: dict) -> str:
    """The phrase of a refusal that depends on what else runs, or ""."""
    if r["outcome"] != "refused":
        return ""
    return next((x for x in ENVIRONMENT if x in (r.get("detail") or "")), "")


def matches(want: str, r: dict) -> bool:
    got = outcome_text(r)
    if got == want:
        return True
    if _environment(r):
        return True
    return any(want.endswith(f"({x})") for x in ENVIRONMENT) and got == "pass"


def outcome_text(r: dict) -> str:
    if r["outcome"] == "refused":
        env = _environment(r)
        return f"refused: {','.join(r.get('reasons') or [])}" + (f" ({env})" if env else "")
    return r["outcome"]


def markdown(results: list) -> str:
    counts: dict = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    lines = ["| outcome | tests |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    lines += ["", "| test | outcome | reasons / detail | criu opts |", "|---|---|---|---|"]
    for r in results:
        if r["outcome"] == "skipped":
            continue
        detail = ", ".join(r.get("reasons") or [])
        detail += (": " if detail else "") + (r.get("detail") or "").replace("\n", " ")[-160:]
        lines.append(f"| {r['test']} | {r['outcome']} | {detail.replace('|', '/')} | {r.get('opts', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=DEFAULT_SRC,
                    help="a CRIU source tree (holding test/zdtm); the default one is fetched when missing")
    ap.add_argument("--suite", default="static", choices=("static", "transition"),
                    help="static: each test's state set up once; transition: tests that keep changing it "
                         "(forking, writing, looping) while they are dumped")
    ap.add_argument("--only", default="", help="test names, comma-separated (default: every static test)")
    ap.add_argument("--work", default="", help="where the tests run (default: a new directory in /var/tmp)")
    ap.add_argument("--out", default="", help="the results as JSON")
    ap.add_argument("--md", default="", help="the results as a markdown table")
    ap.add_argument("--expect-out", default="",
                    help="write the outcomes as the expectations tests/test_zdtm.py holds ckpt to "
                         "(pass, or refused with these reasons; skipped tests left out)")
    ap.add_argument("--ckpt", default=f"{sys.executable} -m engine", help="the ckpt command")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="tests at once")
    ap.add_argument("--fetch-only", action="store_true", help="only fetch the default source (make setup)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="no first run without C/R (for tests known to PASS here)")
    args = ap.parse_args(argv)
    if args.src == DEFAULT_SRC:
        fetch(DEFAULT_SRC)
    if args.fetch_only:
        return 0
    static = os.path.join(args.src, "test", "zdtm", args.suite)
    makefile = os.path.join(static, "Makefile")
    kinds = _lists(makefile)
    special = _special_args(makefile)
    names = [n for n in args.only.split(",") if n] or sorted(kinds)
    unknown = [n for n in names if n not in kinds]
    if unknown:
        print(f"zdtm: not static tests of {static}: {', '.join(unknown)}", file=sys.stderr)
        return 2
    build(args.src, names, max(args.jobs, 2), args.suite)
    work = args.work or tempfile.mkdtemp(prefix="zdtm-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    os.chmod(work, 0o755)     # tests not flagged suid run under CRIU's test ids: they must get to their directories
    env_root = ROOT
    os.environ["PYTHONPATH"] = env_root + (":" + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    ckpt = shlex.split(args.ckpt)
    results = []
    # Socket tests and cgroup tests run one at a time in a lane of their own
    # (NET, CGROUP above).
    # Worker processes, not threads: each is the subreaper of the tests it
    # runs, one at a time, so its waitpid(-1) for their orphans never takes
    # another test's ckpt (subprocess then reads a child reaped elsewhere as
    # exit status 0: a refused dump looked like a dump).
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_subreaper) as pool, \
            concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, initializer=_subreaper) as net:
        futs = {(net if NET.search(n) or CGROUP.search(n) else pool).submit(run_one, n, kinds[n], static, special, work, ckpt,
                                                                not args.no_baseline): n
                for n in names}
        for i, f in enumerate(concurrent.futures.as_completed(futs), 1):
            try:
                r = f.result()
            except Exception as e:   # noqa: BLE001 - one test's trouble is its row
                r = {"test": futs[f], "outcome": "error", "detail": f"runner: {e!r}"}
            results.append(r)
            shown = ", ".join(r.get("reasons") or []) or (r.get("detail") or "")[:100]
            print(f"[{i}/{len(names)}] {r['test']}: {r['outcome']} {shown}", file=sys.stderr, flush=True)
    results.sort(key=lambda r: r["test"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"src": args.src, "kernel": os.uname().release, "results": results}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(results))
    bad = [r for r in results if r["outcome"] in ("FAIL", "lost", "error")]
    if args.expect_out:
        with open(args.expect_out, "w") as f:
            json.dump(expectations(results), f, indent=1, sort_keys=True)
            f.write("\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
