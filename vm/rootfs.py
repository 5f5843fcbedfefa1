"""The slow stage of an image: the Debian tree from mmdebstrap, as a tarball.

Cached on its own (``<cache>/rootfs/<arch>[-<distro>]-<kernel>-<hash>.tar``) under the
hash of :func:`vm.recipe.rootfs_recipe`, so that changing the tiny init, the
initramfs or the ssh settings rebuilds the image in seconds from the cached
tree instead of redoing the install. That matters for foreign arches: an
arm64 tree installed through qemu-user takes ~20 minutes here.

A foreign-arch install runs the guest's maintainer scripts in a chroot, which
the kernel can only exec through binfmt_misc with qemu-user-static
registered; :func:`ensure_foreign_exec` sets that up (or names what is
missing).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from . import buildstep
from . import recipe as R
from .arch import ArchSpec, get_arch
from .errors import HostToolsMissing, VmError
from .paths import rootfs_cache_dir

Progress = buildstep.Progress

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


@dataclass(frozen=True)
class RootfsTarball:
    """A cached mmdebstrap tree."""

    tar: Path
    rootfs_hash: str

    @property
    def info_file(self) -> Path:
        return self.tar.with_suffix(".json")

    @property
    def log(self) -> Path:
        return self.tar.with_suffix(".log")

    def exists(self) -> bool:
        return self.tar.is_file() and self.info_file.is_file()

    def info(self) -> Dict[str, object]:
        return json.loads(self.info_file.read_text())


def rootfs_recipe_for(arch: str, kernel: str, distro: str = R.DEFAULT_DISTRO) -> Dict[str, object]:
    """The rootfs recipe of ``arch`` with distro ``distro`` and kernel choice ``kernel``.

    Raises:
        VmError(kind="usage"|"unsupported"): unknown arch, distro or kernel choice.
    """
    spec = get_arch(arch)
    return R.rootfs_recipe(arch, spec.deb_arch, spec.kernel_package, kernel, is_foreign(spec), distro)


def rootfs_paths(arch: str, kernel: str, distro: str = R.DEFAULT_DISTRO) -> RootfsTarball:
    """Where the tarball for ``arch``/``distro``/``kernel`` is (or would be)."""
    key = R.recipe_hash(rootfs_recipe_for(arch, kernel, distro))
    return RootfsTarball(rootfs_cache_dir() / f"{R.axis_name(arch, kernel, distro)}-{key}.tar", key)


def is_foreign(spec: ArchSpec, host_machine: Optional[str] = None) -> bool:
    """True when the guest's binaries cannot run natively on this host."""
    return (host_machine or platform.machine()) != spec.name


def binfmt_registered(arch: str, binfmt_dir: Path = BINFMT_DIR) -> bool:
    """True if binfmt_misc has an enabled ``qemu-<arch>`` entry."""
    try:
        return (binfmt_dir / f"qemu-{arch}").read_text().splitlines()[0].strip() == "enabled"
    except (OSError, IndexError):
        return False


def ensure_foreign_exec(spec: ArchSpec, say: Progress) -> None:
    """Make foreign ``spec`` binaries runnable here (binfmt_misc + qemu-user).

    Mounts binfmt_misc when it is not (mount(8) ``-t binfmt_misc``; a host
    without systemd does not do it at boot) and enables Debian's
    qemu-user-static entry with ``update-binfmts`` (binfmt-support). Its
    entry has the F flag, so the kernel holds the interpreter open and the
    chroot needs no copy of it (Documentation/admin-guide/binfmt-misc.rst).

    Raises:
        HostToolsMissing: qemu-user-static / binfmt-support not installed.
        VmError(kind="host-tools"): the registration failed (e.g. no
            CAP_SYS_ADMIN to mount binfmt_misc).
    """
    if not is_foreign(spec) or binfmt_registered(spec.name):
        return
    missing = [(t, p) for t, p in ((f"qemu-{spec.name}-static", "qemu-user-static"),
                                   ("update-binfmts", "binfmt-support")) if shutil.which(t) is None]
    if missing:
        raise HostToolsMissing(missing)
    if not (BINFMT_DIR / "register").exists():
        say(f"mounting binfmt_misc on {BINFMT_DIR}")
        res = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise VmError(f"cannot mount binfmt_misc (needed to run {spec.name} binaries in the "
                          f"build chroot): {res.stderr.strip()}", kind="host-tools")
    say(f"registering qemu-{spec.name} with binfmt_misc (update-binfmts --enable)")
    res = subprocess.run(["update-binfmts", "--enable", f"qemu-{spec.name}"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if not binfmt_registered(spec.name):
        raise VmError(f"qemu-{spec.name} is not registered with binfmt_misc after update-binfmts "
                      f"(rc {res.returncode}: {res.stderr.strip()})", kind="host-tools")


def mirror_lines(extra_suites: List[str], suite: str = R.SUITE) -> List[str]:
    """The host's Debian mirrors for ``suite`` (the guest's release), plus
    ``extra_suites`` (e.g. bookworm-backports) on the host's main Debian mirror."""
    from .image import host_mirrors  # image imports us; import late

    lines = host_mirrors(suite)
    main_uri = next(ln.split()[1] for ln in lines if ln.split()[2] == suite)
    for suite in extra_suites:
        if not any(ln.split()[2] == suite for ln in lines):
            lines.append(f"deb {main_uri} {suite} main")
    return lines


def mmdebstrap_argv(rec: Dict[str, object], out: Path, mirrors: List[str]) -> List[str]:
    """mmdebstrap's argv for ``rec`` writing a tarball to ``out``."""
    argv = ["mmdebstrap", "--verbose", "--variant=apt", f"--architectures={rec['deb_arch']}",
            "--include=" + ",".join(rec["packages"]),  # type: ignore[arg-type]
            '--aptopt=APT::Install-Recommends "false"',
            f"--essential-hook={rec['essential_hook']}"]
    argv += [f"--dpkgopt={d}" for d in rec["dpkg_excludes"]]  # type: ignore[union-attr]
    programs = sorted(rec.get("programs") or {})  # type: ignore[call-overload]
    if programs:
        # Plain hooks run on the host with the tree at "$1"; the chroot one
        # compiles with the tree's own gcc (see recipe.programs_build_script).
        srcs = " ".join(shlex.quote(str(R.program_source(n))) for n in programs)
        argv += [f'--customize-hook=mkdir -p "$1{R.PROGRAMS_SRC}" && cp {srcs} "$1{R.PROGRAMS_SRC}/"',
                 f'--customize-hook=chroot "$1" sh -c {shlex.quote(str(rec["programs_build"]))}']
    argv += [str(rec["suite"]), str(out)] + mirrors
    return argv


def ensure_rootfs(arch: str, kernel: str = R.DEFAULT_KERNEL, say: Optional[Progress] = None,
                  force: bool = False, distro: str = R.DEFAULT_DISTRO) -> RootfsTarball:
    """The cached tarball of ``arch``/``distro``/``kernel``, built if missing.

    Built in ``.build-<name>/`` and renamed into place under a lock; a failed
    build leaves only ``<name>.failed.log``.

    Raises:
        HostToolsMissing, VmError(kind="host-tools"): cannot run the foreign
            arch's binaries (see :func:`ensure_foreign_exec`).
        VmError(kind="image"): mmdebstrap failed (log tail in the message).
    """
    say = say or (lambda msg: None)
    spec = get_arch(arch)
    rec = rootfs_recipe_for(arch, kernel, distro)
    dest = rootfs_paths(arch, kernel, distro)
    if dest.exists() and not force:
        return dest
    lock_path = dest.tar.parent / f".lock-{dest.tar.stem}"
    with open(lock_path, "w") as lock:
        say(f"rootfs: taking the build lock {lock_path}")
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if dest.exists() and not force:
            say("rootfs: another process built it meanwhile")
            return dest
        ensure_foreign_exec(spec, say)
        tmp = dest.tar.parent / f".build-{dest.tar.stem}"
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted earlier build; we hold the lock
        tmp.mkdir()
        log = tmp / "mmdebstrap.log"
        t0 = time.monotonic()
        try:
            mirrors = mirror_lines(list(rec["extra_suites"]), distro)  # type: ignore[call-overload]
            foreign = " through qemu-user (slow: ~20 min for arm64 here)" if is_foreign(spec) else ""
            say(f"rootfs: mmdebstrap {rec['suite']} {rec['deb_arch']} kernel {kernel}{foreign}; "
                f"log: {log}")
            # Its own mount namespace: mmdebstrap (root mode) mounts /proc,
            # /sys, /dev/pts into the chroot and a killed build would leave
            # them on the host; in a private namespace they die with it
            # (unshare(1), mount_namespaces(7)). TMPDIR keeps its scratch
            # tree inside our build dir, removed below whatever happens.
            argv = ["unshare", "--mount", "--propagation", "private"]
            argv += mmdebstrap_argv(rec, tmp / "rootfs.tar", mirrors)
            buildstep.run_step(argv, log, say, "mmdebstrap", env={"TMPDIR": str(tmp)})
            seconds = round(time.monotonic() - t0, 1)
            info = {"arch": arch, "kernel": kernel, "distro": distro, "rootfs_hash": dest.rootfs_hash,
                    "mmdebstrap_seconds": seconds, "tar_mb": (tmp / "rootfs.tar").stat().st_size // 2**20,
                    "recipe": rec, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / "rootfs.json").write_text(json.dumps(info, indent=1, sort_keys=True))
            os.replace(log, dest.log)
            os.replace(tmp / "rootfs.json", dest.info_file)
            os.replace(tmp / "rootfs.tar", dest.tar)  # last: the tar's presence means done
            say(f"rootfs: done in {seconds:.0f} s: {dest.tar}")
        except BaseException:
            if log.exists():
                shutil.copy2(log, dest.tar.with_suffix(".failed.log"))
            dest.info_file.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    prune_old_rootfs(arch, kernel, keep=dest.tar, distro=distro)
    return dest


def prune_old_rootfs(arch: str, kernel: str, keep: Path, keep_count: int = 2,
                     distro: str = R.DEFAULT_DISTRO) -> None:
    """Keep the newest ``keep_count`` tarballs of ``arch``/``distro``/``kernel``."""
    others = sorted((p for p in rootfs_cache_dir().glob(f"{R.axis_name(arch, kernel, distro)}-*.tar")
                     if p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[max(0, keep_count - 1):]:
        for suffix in (".tar", ".json", ".log"):
            old.with_suffix(suffix).unlink(missing_ok=True)
