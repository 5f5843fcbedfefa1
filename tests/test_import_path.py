"""What `ckpt dump` and `ckpt restore` of a small process import (issue 15).

Under TCG every import costs 10-15x the host's: typing ~35 ms, json with
re and enum ~70 ms, contextlib ~50 ms, hashlib's module ~8 ms, the tree
restorer ~25 ms. The engine does without them on these paths (its own
fastjson over _json, _signal, str methods, lazy imports); this runs a real
dump and restore on this host under `-X importtime` (which lists every
module imported by ckpt and by its forked worker and restorer) and names
any that came back. The engine is started as `python3 -S -c` (not `-m`:
runpy itself imports contextlib and importlib.util).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from engine_core_support import procs, start_ready_script  # noqa: F401 - fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = "import sys; from engine.cli import main; sys.exit(main())"
# Never on these paths (a module a single process's dump or restore of a
# sleeping python3 needs is none of these)
NEVER = ("typing", "json", "re", "enum", "signal", "hashlib", "contextlib", "functools", "collections",
         "importlib", "argparse", "threading", "socket", "engine.tree_restore")


def _ckpt(*args, **env_extra):
    env = dict(os.environ, PYTHONPATH=REPO, **env_extra)
    r = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c", MAIN, *args], capture_output=True,
                       text=True, env=env, timeout=120, close_fds=True)
    assert r.returncode == 0, r.stderr[-3000:]
    names = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    return json.loads(r.stdout), names


def test_dump_and_restore_import_only_what_they_need(procs, tmp_path):  # noqa: F811
    p = start_ready_script(procs, tmp_path, "")
    img = str(tmp_path / "img")
    out, dumped = _ckpt("dump", "-t", str(p.pid), "-D", img, "--json")
    assert out["ok"]
    p.wait(timeout=30)
    out, restored = _ckpt("restore", "-D", img, "--json")
    procs.adopt(out["result"]["pid"])
    assert "engine.dump" in dumped and "engine.build" in restored     # the worker's and restorer's imports are seen
    assert "_sha256" in dumped and "_json" in restored
    assert sorted(m for m in NEVER if m in dumped) == []
    assert sorted(m for m in NEVER if m in restored) == []


def test_a_small_static_process_loads_no_openssl(procs, tmp_path):  # noqa: F811
    """Its image files are all small but the pages (CRC'd, not sha256'd),
    and its one mapped file's digest is remembered after the first dump
    (engine/digestcache.py: once the file is 2 s old): engine/sha256.py
    hashes what is left with the interpreter's own _sha256, and OpenSSL
    (~2 ms, ~200 page faults of a run on the host) is not loaded."""
    exe = str(tmp_path / "memhog")
    subprocess.run(["gcc", "-O2", "-static", "-o", exe, os.path.join(REPO, "tests", "targets", "memhog.c")],
                   check=True, capture_output=True)
    ready = tmp_path / "ready"
    p = procs.start([exe, "1", str(ready)])
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text().endswith("\n")):
        assert p.poll() is None and time.monotonic() < deadline, "memhog did not get ready"
        time.sleep(0.01)
    pid = p.pid
    cache = tmp_path / "digests"
    cache.mkdir(mode=0o700)
    time.sleep(2.1)         # (digestcache.SETTLED_NS: a file changed since is not remembered)
    for round in (1, 2):
        img = str(tmp_path / f"img{round}")
        out, dumped = _ckpt("dump", "-t", str(pid), "-D", img, "--json", CKPT_DIGEST_CACHE=str(cache / "d.json"))
        assert out["ok"]
        if round == 1:
            p.wait(timeout=30)
        else:
            procs.reap(pid)
        out, restored = _ckpt("restore", "-D", img, "--json", CKPT_DIGEST_CACHE=str(cache / "d.json"))
        pid = out["result"]["pid"]
        procs.adopt(pid)
    assert "engine.dump" in dumped and "_sha256" in dumped and "engine.build" in restored
    assert "_hashlib" not in dumped and "_hashlib" not in restored
