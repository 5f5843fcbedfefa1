"""A working modern criu on a Debian 12 host, for the host comparison.

Debian 12's criu (3.17.1) fails on newer host kernels (``criu check``:
"Could not initialize kernel features detection."), so the host had no
criu figures. Debian 13 (trixie) ships criu 4.1, but its .deb needs trixie's
libc, newer than the host's. So: trixie's criu and the .debs of its
shared-library closure are fetched with a private apt configuration (its own
sources, lists, status and cache under the cache dir; the host's sources,
package state and packages are not touched), unpacked with ``dpkg-deb -x``
into a private prefix, and run by trixie's own dynamic loader with only that
prefix's libraries: :func:`command` gives that argv (what the comparison
runs: no shell in front, so criu's measured start-up is the loader's and
criu's own, as a native install's), and ``<cache>/criu/<suite>-<arch>/criu``
is a wrapper script running the same for use by hand.

criu's parasite and restorer blobs are built into the binary; plugins
(``--libdir``) point at the prefix's own (empty) plugin dir, so a host
criu's plugins in /usr/lib/criu are never loaded into this one.

``python3 -m harness.hostcriu [install|check|path] [--refresh]``;
``make host-criu`` installs it. :func:`choose` picks the criu the host
comparison uses: this one first, then the host's own, each only when
``criu check`` passes.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

SUITE = "trixie"
PACKAGE = "criu"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
STAMP = "installed.json"

WRAPPER = """#!/bin/sh
# {suite}'s criu {version} run by {suite}'s own loader and libraries (harness/hostcriu.py)
exec {argv} "$@"
"""


class HostCriuError(Exception):
    """The private criu could not be installed; the message says why."""


def parse_version(text: str) -> Optional[Tuple[int, ...]]:
    """criu's ``--version`` output ("Version: 4.1.1", "Version: 3.17.1",
    "Version: 4.2\\nGitID: v4.2-12-g..") -> (4, 1, 1); None when it names no
    version."""
    m = re.search(r"^\s*Version:\s*(\d+(?:\.\d+)*)", text, re.M)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def prefix_dir(suite: str = SUITE, arch: Optional[str] = None) -> Path:
    from vm.paths import cache_dir
    return cache_dir() / "criu" / f"{suite}-{arch or dpkg_arch()}"


def dpkg_arch() -> str:
    r = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, close_fds=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise HostCriuError(f"dpkg --print-architecture failed: {r.stderr.strip()}")
    return r.stdout.strip()


def sources_lines(suite: str = SUITE) -> List[str]:
    """``deb`` lines for ``suite`` on the host's own Debian mirror (the one
    known to work here, vm.image.host_mirrors), each verified with Debian's
    archive keyring (the private config has no trusted.gpg.d)."""
    from vm.image import host_mirrors
    return [re.sub(r"^deb ", f"deb [signed-by={KEYRING}] ", ln) for ln in host_mirrors(suite)]


class PrivateApt:
    """apt-get/apt-cache with every Dir:: of state under ``root``: its own
    sources.list, lists, empty dpkg status and cache. The host's apt.conf.d
    still applies (a proxy set there is needed here too)."""

    def __init__(self, root: Path, arch: str, lines: Sequence[str]):
        self.root = root
        for d in ("etc/sources.list.d", "etc/preferences.d", "etc/trusted.gpg.d", "lists/partial",
                  "cache/archives/partial"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "etc/sources.list").write_text("\n".join(lines) + "\n")
        (root / "status").write_text("")
        self.opts = []
        for k, v in (("Dir::Etc", root / "etc"), ("Dir::Etc::sourcelist", root / "etc/sources.list"),
                     ("Dir::Etc::sourceparts", root / "etc/sources.list.d"),
                     ("Dir::Etc::preferences", root / "etc/preferences"),
                     ("Dir::Etc::preferencesparts", root / "etc/preferences.d"),
                     ("Dir::Etc::trusted", root / "etc/trusted.gpg"),
                     ("Dir::Etc::trustedparts", root / "etc/trusted.gpg.d"),
                     ("Dir::State", root), ("Dir::State::lists", root / "lists"),
                     ("Dir::State::status", root / "status"), ("Dir::Cache", root / "cache"),
                     ("APT::Architecture", arch), ("APT::Architectures::", arch),
                     # downloads go to our own dir, which _apt cannot write
                     ("APT::Sandbox::User", "root"),
                     # private lists: no lock shared with the host's apt
                     ("Debug::NoLocking", "1")):
            self.opts += ["-o", f"{k}={v}"]

    def run(self, tool: str, args: Sequence[str], cwd: Optional[Path] = None) -> str:
        argv = [tool, "-q"] + self.opts + list(args)
        r = subprocess.run(argv, capture_output=True, text=True, close_fds=True, cwd=cwd,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C"))
        if r.returncode != 0:
            raise HostCriuError(f"{tool} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
        return r.stdout


def closure(sim_output: str) -> Dict[str, str]:
    """{package: version} that ``apt-get -s install`` would unpack, from its
    "Inst NAME (VERSION ...)" lines (the solver's choice among alternatives
    and virtual packages, which a plain depends walk cannot make)."""
    out = {}
    for m in re.finditer(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+)", sim_output, re.M):
        out[m.group(1)] = m.group(2)
    return out


def _loader(root: Path) -> str:
    """The prefix's ELF interpreter (ld-linux-x86-64.so.2,
    ld-linux-aarch64.so.1), relative to ``root``."""
    found = sorted(p for p in root.glob("usr/lib/*/ld-linux*.so.*") if p.is_file())
    if not found:
        raise HostCriuError(f"no dynamic loader in the unpacked libc6 under {root}")
    return str(found[0].relative_to(root))


def _libdirs(root: Path) -> List[str]:
    """Directories of the prefix that hold shared libraries, relative to
    ``root``."""
    dirs = sorted({p.parent for p in root.glob("usr/lib/*/*.so*")} | {p.parent for p in root.glob("lib/*/*.so*")})
    return [str(d.relative_to(root)) for d in dirs]


def command_in(prefix: Path, loader: str, libdirs: Sequence[str]) -> List[str]:
    """The argv that runs the prefix's criu: its loader, only its library
    dirs (searched before the host's ld.so.cache, which then finds nothing
    it needs), and its own plugin dir."""
    root = prefix / "root"
    return [str(root / loader), "--library-path", ":".join(str(root / d) for d in libdirs),
            str(root / "usr/sbin/criu"), "--libdir", str(root / "usr/lib/criu")]


def command(prefix: Optional[Path] = None) -> Optional[List[str]]:
    """The argv of the installed private criu (None: not installed)."""
    prefix = prefix or prefix_dir()
    stamp = installed(prefix)
    if not stamp or "loader" not in stamp:
        return None
    return command_in(prefix, stamp["loader"], stamp["libdirs"])


def run_check(criu: Sequence[str], timeout: float = 60) -> Tuple[bool, str]:
    """(works, why): ``criu check`` exits 0 on this kernel; why is its
    last error line otherwise."""
    try:
        r = subprocess.run(list(criu) + ["check"], capture_output=True, text=True, timeout=timeout, close_fds=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"criu check could not run: {e}"
    if r.returncode == 0:
        return True, ""
    lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln] or lines
    return False, (errs[-1] if errs else f"criu check exited {r.returncode}")


def version_of(criu: Sequence[str]) -> str:
    """criu's ``--version`` output on one line ("Version: 4.1.1")."""
    try:
        r = subprocess.run(list(criu) + ["--version"], capture_output=True, text=True, timeout=60, close_fds=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"
    return " ".join((r.stdout or r.stderr).split())


def installed(prefix: Optional[Path] = None) -> Optional[Dict]:
    """The stamp of a complete install at ``prefix`` (None: none there)."""
    prefix = prefix or prefix_dir()
    try:
        doc = json.loads((prefix / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and (prefix / "criu").is_file() else None


def install(suite: str = SUITE, refresh: bool = False, log: Callable[[str], None] = lambda s: None) -> Path:
    """Fetch and unpack ``suite``'s criu into the cache (once: a complete
    install is reused unless ``refresh``); the prefix. The new prefix
    replaces the old only once it is complete and ``criu --version`` runs
    from it."""
    arch = dpkg_arch()
    prefix = prefix_dir(suite, arch)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.parent / f".{prefix.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not refresh and command(prefix):
            return prefix
        for tool in ("apt-get", "dpkg-deb"):
            if not shutil.which(tool):
                raise HostCriuError(f"{tool} not found (a Debian host is needed)")
        if not Path(KEYRING).is_file():
            raise HostCriuError(f"{KEYRING} missing (apt-get install debian-archive-keyring)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{prefix.name}-", dir=prefix.parent))
        tmp.chmod(0o755)
        try:
            apt = PrivateApt(tmp / "apt", arch, sources_lines(suite))
            log(f"host-criu: apt-get update ({suite}, private lists)")
            apt.run("apt-get", ["update"])
            pkgs = closure(apt.run("apt-get", ["-s", "--no-install-recommends", "install", PACKAGE]))
            if PACKAGE not in pkgs:
                raise HostCriuError(f"{suite} has no {PACKAGE} for {arch}")
            debs = tmp / "debs"
            debs.mkdir()
            log(f"host-criu: downloading {len(pkgs)} packages: {' '.join(sorted(pkgs))}")
            apt.run("apt-get", ["download"] + [f"{p}={v}" for p, v in sorted(pkgs.items())], cwd=debs)
            root = tmp / "root"
            for deb in sorted(debs.glob("*.deb")):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, close_fds=True)
            (root / "usr/lib/criu").mkdir(parents=True, exist_ok=True)   # our plugin dir: empty
            loader, libdirs = _loader(root), _libdirs(root)
            ver = version_of(command_in(tmp, loader, libdirs))
            if not parse_version(ver):
                raise HostCriuError(f"the unpacked criu does not run: {ver}")
            # the wrapper names the final paths (it runs once renamed into place)
            wrapper = tmp / "criu"
            wrapper.write_text(WRAPPER.format(suite=suite, version=pkgs[PACKAGE],
                                              argv=shlex.join(command_in(prefix, loader, libdirs))))
            wrapper.chmod(0o755)
            shutil.rmtree(debs)
            shutil.rmtree(tmp / "apt")
            (tmp / STAMP).write_text(json.dumps({"suite": suite, "arch": arch, "packages": pkgs,
                                                 "loader": loader, "libdirs": libdirs,
                                                 "criu_version": ver, "deb_version": pkgs[PACKAGE],
                                                 "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                                indent=1, sort_keys=True) + "\n")
            old = prefix.parent / f".{prefix.name}-old"
            if prefix.exists():
                shutil.rmtree(old, ignore_errors=True)
                prefix.rename(old)
            tmp.rename(prefix)
            shutil.rmtree(old, ignore_errors=True)
            log(f"host-criu: {ver} ({suite} {pkgs[PACKAGE]}) in {prefix}")
            return prefix
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


Candidate = Tuple[str, Optional[List[str]]]


def choose(candidates: Sequence[Candidate], check: Callable[[Sequence[str]], Tuple[bool, str]] = run_check
           ) -> Tuple[Optional[Candidate], List[str]]:
    """The first of ``candidates`` ((label, argv or None)) whose ``criu
    check`` passes, and why each one before it was passed over."""
    why: List[str] = []
    for label, argv in candidates:
        if not argv:
            why.append(f"{label}: not installed")
            continue
        ok, err = check(argv)
        if ok:
            return (label, argv), why
        why.append(f"{label} ({argv[-1] if len(argv) == 1 else shlex.join(argv)}): "
                   f"criu check fails on kernel {os.uname().release}: {err}")
    return None, why


def host_candidates(ensure: bool = True, log: Callable[[str], None] = lambda s: None) -> List[Candidate]:
    """The private criu (installed now when ``ensure`` and missing; an
    install that fails is named, not raised), then the host's own."""
    private: Optional[List[str]] = None
    label = f"Debian {SUITE} criu in a private prefix"
    stamp = installed()
    try:
        private = command()
        if not private and ensure:
            private = command(install(log=log))
            stamp = installed()
    except (HostCriuError, OSError, subprocess.CalledProcessError) as e:
        label += f" [install failed: {str(e)[-300:]}]"
    if stamp and private:
        label = f"Debian {stamp['suite']} criu {stamp['deb_version']} in a private prefix, run by its own loader"
    host = shutil.which("criu")
    return [(label, private), ("the host's criu", [host] if host else None)]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m harness.hostcriu", description=__doc__.splitlines()[0])
    ap.add_argument("action", nargs="?", default="install", choices=("install", "check", "path"))
    ap.add_argument("--refresh", action="store_true", help="fetch again even when installed")
    args = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)   # noqa: E731
    try:
        prefix = install(refresh=args.refresh, log=log) if args.action == "install" else prefix_dir()
    except HostCriuError as e:
        log(f"host-criu: {e}")
        return 1
    argv = command(prefix)
    if not argv:
        log(f"host-criu: not installed in {prefix} (make host-criu)")
        return 1
    wrapper = prefix / "criu"
    if args.action == "path":
        print(wrapper)
        return 0
    ok, err = run_check(argv)
    print(f"{wrapper}: {version_of(argv)}; criu check: {'ok' if ok else err}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
