#!/usr/bin/env python3
"""Fuzz `ckpt restore` with mutated images (harness/imagefuzz.py): N cases
from one seed, each must be refused before any process exists, with no
traceback and nothing written outside the paths given. Prints the figures
and merges them into bench/reliability.json under "fuzz" (other keys are
left alone). Exit 1 when any case failed.

usage: python3 bench/fuzz_images.py [--cases 500] [--seed 1] [--out bench/reliability.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from harness import imagefuzz  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "reliability.json"))
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep every case's directory")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("fuzz_images: run as root (the engine restores as root)", file=sys.stderr)
        return 2
    base = args.keep or tempfile.mkdtemp(prefix="ckpt-fuzz-")

    def progress(row):
        if args.verbose or not row["ok"]:
            flag = "ok  " if row["ok"] else "FAIL"
            print(f"{flag} {row['index']:4d} {row['kind']:<9} {row['outcome']:<8} {','.join(row['reasons']):<28} "
                  f"{row['mutation']}" + ("" if row["ok"] else
                                          f"\n       created={row['created']} leftover={row['leftover']} "
                                          f"written={row['written']} show={row['show']} "
                                          f"traceback={row['traceback']}\n       {row['stderr'][-300:]}"),
                  flush=True)

    try:
        summary, _ = imagefuzz.run(args.cases, args.seed, base, keep=bool(args.keep), progress=progress)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    try:
        with open(args.out) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    data["fuzz"] = summary
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"fuzz: {summary['cases']} mutated images (seed {summary['seed']}): {summary['refused_ok']} refused "
          f"before any process, {summary['failures']} failures; processes created {summary['processes_created']}, "
          f"tracebacks {summary['tracebacks']}, files written outside {summary['files_written_outside']}; "
          f"median {summary['ms_median']} ms/case")
    for kind, k in sorted(summary["by_kind"].items()):
        print(f"  {kind:<9} {k['cases']:4d} cases  {k['refused']:4d} refused  {k['failed']:3d} failed")
    print("  reasons: " + ", ".join(f"{r} {n}" for r, n in sorted(summary["reasons"].items())))
    return 0 if summary["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
