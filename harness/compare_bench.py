"""``python3 -m harness compare``: ckpt against criu in one guest, one run.

Boots one guest of ``--arch``/``--distro``/``--kernel`` with the engine
installed, copies in bench/compare.py and a static memhog, runs it there
(the guest's own criu: 3.17 in bookworm, 4.1 in trixie) and merges its rows
into bench/results.json under ``compare`` / <cell>. With ``--host`` it also
runs on this machine, with Debian 13's criu 4.1 from a private prefix
(harness/hostcriu.py: Debian 12's 3.17 fails ``criu check`` on newer
kernels; fetched into ~/.cache/crucible/criu on first use) or, failing
that, the host's own when its ``criu check`` passes; ckpt there runs on
the distribution's python3, as in the guests (:func:`engine_python`).

Many tasks (issue 11): a tree of 50 small processes and a process with
50 threads (tests/targets/swarm.c, static), dump/restore/frozen time for
both tools (``--swarm-cases``; empty: none).

Sizes: 1 and 64 MiB of touched memory by default. 1 GiB is the size the
issue measured on real hardware, but under TCG one such dump takes minutes,
and the guest has 1 GiB of RAM: pass ``--sizes`` for more on KVM.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from .bench import merge_into
from .targets import REPO
from .zygote import command_line
from vm.recipe import bundle_line

SCRIPT = REPO / "bench" / "compare.py"
MEMHOG_SRC = REPO / "tests" / "targets" / "memhog.c"
SWARM_SRC = REPO / "tests" / "targets" / "swarm.c"


def _static_memhog(out: Path) -> Path:
    exe = out / "memhog"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(MEMHOG_SRC)], check=True, close_fds=True)
    return exe


def _static_swarm(out: Path) -> Path:
    exe = out / "swarm"
    subprocess.run(["gcc", "-O2", "-static", "-pthread", "-o", str(exe), str(SWARM_SRC)], check=True, close_fds=True)
    return exe


def in_guest(arch: str, accel: str, kernel: Optional[str], distro: Optional[str], sizes: str,
             rounds: int, timeout: float, engine_dir: Optional[str] = None, swarm_cases: str = "",
             base_engine_dir: Optional[str] = None) -> Dict:
    from vm import Guest, ensure_image
    kw = {}
    if kernel:
        kw["kernel"] = kernel
    if distro:
        kw["distro"] = distro
    img = ensure_image(arch, **kw)
    with tempfile.TemporaryDirectory(prefix="crucible-compare-") as tmp:
        exe = _static_memhog(Path(tmp))
        swarm = _static_swarm(Path(tmp)) if swarm_cases else None
        with Guest(arch=arch, accel=accel, name="bench-compare", log_dir=str(REPO / "reports" / "guests"),
                   image=img, memory_mb=1024, engine_dir=engine_dir or str(REPO / "engine"),
                   ready_timeout=300, ssh_timeout=300,       # TCG on a loaded host boots slowly
                   **({"distro": distro} if distro else {})) as g:
            g.put(str(exe), "/root/memhog")
            g.put(str(SCRIPT), "/root/compare.py")
            extra = []
            if base_engine_dir:
                # the older engine beside, run as main's wrapper runs it (tool "ckpt_base")
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tar:
                    tar.add(base_engine_dir, arcname="engine",
                            filter=lambda i: None if "__pycache__" in i.name.split("/") else i)
                g.put_bytes(buf.getvalue(), "/root/base-engine.tar")
                g.run("rm -rf /opt/crucible-base && mkdir -p /opt/crucible-base && "
                      "tar -x --no-same-owner -C /opt/crucible-base -f /root/base-engine.tar && "
                      "python3 -m compileall -q /opt/crucible-base/engine >/dev/null && "
                      + bundle_line("python3", "/opt/crucible-base"), timeout=600, check=True)
                extra += ["--ckpt-base", command_line("python3", "/opt/crucible-base")]
            if swarm:
                g.put(str(swarm), "/root/swarm")
                extra += ["--swarm", "/root/swarm", "--swarm-cases", swarm_cases]
            r = g.run(["python3", "/root/compare.py", "--memhog", "/root/memhog", "--sizes", sizes,
                       "--rounds", str(rounds), "--dirs", "/dev/shm,/var/tmp", "--out", "/root/compare.json"] + extra,
                      timeout=timeout)
            if r.rc != 0:
                raise RuntimeError(f"compare.py failed in the guest ({r.rc}):\n{r.stderr[-3000:]}")
            doc = json.loads(g.get_bytes("/root/compare.json"))
            doc["accel"] = getattr(g, "accel", accel)
    doc.update({"where": "guest", "arch": arch, "distro": distro or "bookworm", "kernel_axis": kernel or "default"})
    return doc


def engine_python() -> str:
    """The interpreter the host compare runs ckpt on: the distribution's
    /usr/bin/python3, the one the engine runs on in guests and on users'
    machines, when it is there and runs; else this one. The harness's own
    interpreter may be another build (a pyenv one here starts ~8 ms slower
    per ckpt run), which would charge ckpt for an interpreter it does not
    ship with."""
    system = "/usr/bin/python3"
    if os.path.realpath(system) != os.path.realpath(sys.executable) and os.access(system, os.X_OK):
        try:
            subprocess.run([system, "-S", "-c", "import ctypes"], check=True, timeout=30, close_fds=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return system
        except (OSError, subprocess.SubprocessError):
            pass
    return sys.executable


def on_host(sizes: str, rounds: int, swarm_cases: str = "", base_engine_dir: Optional[str] = None,
            ensure_criu: bool = True) -> Optional[Dict]:
    """The same comparison on this machine, with the first criu whose
    ``criu check`` passes here: Debian 13's in a private prefix
    (harness/hostcriu.py; fetched into the cache now when missing and
    ``ensure_criu``), else the host's own. When none works (the reasons on
    stderr and in the result), ckpt alone: its figures on the same
    processes, without ratios."""
    from . import hostcriu
    log = lambda s: print(s, file=sys.stderr, flush=True)   # noqa: E731
    chosen, passed_over = hostcriu.choose(hostcriu.host_candidates(ensure=ensure_criu, log=log))
    why = None if chosen else "no working criu on this host: " + "; ".join(passed_over)
    criu = shlex.join(chosen[1]) if chosen else ""
    if why:
        print(f"compare: {why}; ckpt alone", file=sys.stderr)
    python = engine_python()
    with tempfile.TemporaryDirectory(prefix="crucible-compare-") as tmp:
        exe = _static_memhog(Path(tmp))
        out = Path(tmp) / "compare.json"
        extra = ["--swarm", str(_static_swarm(Path(tmp))), "--swarm-cases", swarm_cases] if swarm_cases else []
        if base_engine_dir:
            parent = str(Path(base_engine_dir).resolve().parent)
            extra += ["--ckpt-base", command_line(python, parent)]
        # as the guests' wrapper runs it (harness/zygote.py CODE): -S, no runpy, the root first on sys.path
        subprocess.run([sys.executable, str(SCRIPT), "--memhog", str(exe), "--sizes", sizes, "--rounds", str(rounds),
                        "--ckpt", command_line(python, str(REPO)), "--criu", criu,
                        "--out", str(out)] + extra,
                       check=True, cwd=str(REPO), close_fds=True)
        doc = json.loads(out.read_text())
    doc["where"] = "host"
    doc["ckpt_python"] = python
    if why:
        doc["criu_unavailable"] = why
    else:
        doc["criu_source"], doc["criu_command"], doc["criu_passed_over"] = chosen[0], criu, passed_over
    return doc


def cell_name(arch: str, distro: Optional[str], kernel: Optional[str]) -> str:
    """'guest x86_64', 'guest x86_64 trixie', '... kernel backports' (the
    kernel only when it is not the distro's own)."""
    try:
        from vm.recipe import DEFAULT_KERNELS
        own = DEFAULT_KERNELS.get(distro or "bookworm")
    except ImportError:
        own = None
    name = f"guest {arch}"
    if distro and distro != "bookworm":
        name += f" {distro}"
    if kernel and kernel != own:
        name += f" kernel {kernel}"
    return name


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m harness compare", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    ap.add_argument("--arch", default=os.environ.get("ARCH", "x86_64"))
    ap.add_argument("--accel", default="auto")
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--distro", default=None, help="guest distro (bookworm: criu 3.17, trixie: criu 4.1)")
    ap.add_argument("--sizes", default="1,64", help="touched MiB per case (1 GiB is too slow under TCG)")
    ap.add_argument("--swarm-cases", default="tree:50,threads:50",
                    help="many-task cases MODE:N (tree, threads), comma-separated; empty: none")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--host", action="store_true", help="also compare on this host (Debian 13's criu in a private "
                                                         "prefix, else the host's, whichever passes criu check)")
    ap.add_argument("--no-criu-install", action="store_true",
                    help="--host: do not fetch the private criu when it is missing")
    ap.add_argument("--no-guest", action="store_true")
    ap.add_argument("--engine-dir", help="another engine package to measure (e.g. an older commit's, for before/after)")
    ap.add_argument("--base-engine-dir", help="an older engine package measured beside in the same guest "
                                              "(tool ckpt_base: before/after in one run)")
    ap.add_argument("--cell", help="the name of the result entry (default: from arch, distro, kernel)")
    args = ap.parse_args(argv)
    # bytecode and bundle for the host runs, for the interpreter that runs ckpt
    # there (the guest makes its own at install)
    python = engine_python() if args.host else sys.executable
    for root in [REPO] + ([Path(args.base_engine_dir).resolve().parent] if args.base_engine_dir else []):
        subprocess.run([python, "-m", "compileall", "-q", str(root / "engine")], stdout=subprocess.DEVNULL,
                       close_fds=True)
        subprocess.run(["sh", "-c", bundle_line(shlex.quote(python), str(root))], close_fds=True)
    if not args.no_guest:
        t0 = time.monotonic()
        doc = in_guest(args.arch, args.accel, args.kernel, args.distro, args.sizes, args.rounds, args.timeout,
                       args.engine_dir, args.swarm_cases, args.base_engine_dir)
        doc["bench_wall_s"] = round(time.monotonic() - t0, 1)
        merge_into(Path(args.out), "compare", args.cell or cell_name(args.arch, args.distro, args.kernel), doc)
        print(json.dumps(doc["rows"] + doc.get("swarm_rows", []), indent=1))
    if args.host:
        doc = on_host(args.sizes, args.rounds, args.swarm_cases, args.base_engine_dir,
                      ensure_criu=not args.no_criu_install)
        if doc is not None:
            merge_into(Path(args.out), "compare", "host", doc)
            print(json.dumps(doc["rows"] + doc.get("swarm_rows", []), indent=1))
    return 0
