"""CKPT_PROFILE=DIR (engine/profiling.py): the dump worker, restore's checks
and the restorer each leave a cProfile file there; without it, none is
written and a dump does not even import profiling.py."""

from __future__ import annotations

import json
import os
import pstats
import subprocess
import sys

from engine_core_support import procs, start_ready_script  # noqa: F401 - fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = f"import sys; sys.path[0] = {REPO!r}; import engine.__main__"


def _ckpt(args, **env):
    r = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c", CODE, *args], capture_output=True, text=True,
                       timeout=120, close_fds=True, env=dict(os.environ, **env))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)["result"], r.stderr


def test_profiles_written_only_when_asked(procs, tmp_path):  # noqa: F811
    out = tmp_path / "prof"
    for asked in (False, True):
        cwd = tmp_path / f"target{asked}"
        cwd.mkdir()
        p = start_ready_script(procs, cwd, "")
        env = {"CKPT_PROFILE": str(out)} if asked else {}
        _, dumped = _ckpt(["dump", "-t", str(p.pid), "-D", str(tmp_path / f"img{asked}"), "--json"], **env)
        p.wait(timeout=30)
        res, restored = _ckpt(["restore", "-D", str(tmp_path / f"img{asked}"), "--json"], **env)
        procs.adopt(res["pid"])
        if not asked:
            assert not out.exists()
            assert "engine.profiling" not in dumped
    names = sorted(n.rsplit("-", 1)[0] for n in os.listdir(out))
    assert names == ["dump", "restore", "restore-checks"], names     # the worker's, the restorer's, ckpt's
    for n in os.listdir(out):
        pstats.Stats(str(out / n))      # a real profile
