"""CKPT_PROFILE=DIR: the process that does a command's work (the dump
worker, the restorer) runs it under cProfile and leaves DIR/<what>-<pid>.prof
(`python3 -m pstats`). For finding where the time goes (issue 15: under TCG
every Python call is ~15x dearer than on hardware); off, it costs one getenv.
The profile is written whatever the work's outcome, before the worker
reports, so ckpt's own exit waits for it."""

from __future__ import annotations

import os


def run(what: str, fn, *args):
    out = os.environ.get("CKPT_PROFILE")
    if not out:
        return fn(*args)
    import cProfile
    prof = cProfile.Profile()
    try:
        return prof.runcall(fn, *args)
    finally:
        try:
            os.makedirs(out, exist_ok=True)
            prof.dump_stats(os.path.join(out, f"{what}-{os.getpid()}.prof"))
        except OSError:
            pass    # a profile is a developer's aid: never a reason for the work to fail
