"""Build (or reuse) the guest image: Debian root fs, kernel, initramfs, SSH key.

The image directory is ``<cache>/images/<arch>-<recipe hash>/``. A build runs
in ``.build-<arch>-<hash>/`` next to it and is renamed into place only when
complete (rename(2) is atomic), so an interrupted build never looks done. A
lock file serialises concurrent builds (pytest-xdist workers).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from . import buildstep
from . import recipe as R
from .arch import get_arch
from .errors import HostToolsMissing, VmError
from .initramfs import build_initramfs
from .paths import images_dir
from .rootfs import ensure_rootfs, is_foreign

Progress = Callable[[str], None]

#: host tool -> the Debian package that provides it
BUILD_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "mke2fs": "e2fsprogs",
    "ssh-keygen": "openssh-client",
    "qemu-img": "qemu-utils",
    "tar": "tar",
}
#: extra host tools for a foreign-arch rootfs (maintainer scripts in a chroot)
FOREIGN_BUILD_TOOLS = {"update-binfmts": "binfmt-support"}
RUN_TOOLS = {"qemu-img": "qemu-utils"}
HOST_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


@dataclass(frozen=True)
class ImagePaths:
    """The files of one built image."""

    dir: Path
    arch: str
    recipe_hash: str
    #: the guest-kernel axis value (a key of ``vm.recipe.DISTROS[distro]``), not a path
    kernel_choice: str = R.DEFAULT_KERNEL
    #: the guest-distro axis value (a key of ``vm.recipe.DISTROS``)
    distro: str = R.DEFAULT_DISTRO

    @property
    def rootfs(self) -> Path:
        """The ext4 root filesystem (raw), backing file of every overlay."""
        return self.dir / "rootfs.ext4"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def ssh_key(self) -> Path:
        """Private key (OpenSSH ed25519) for root in the guest."""
        return self.dir / "id_ed25519"

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"

    def exists(self) -> bool:
        return self.manifest.is_file() and all(
            p.is_file() for p in (self.rootfs, self.kernel, self.initrd, self.ssh_key))

    def info(self) -> Dict[str, object]:
        """The manifest written at build time (kernel release, sizes, timings)."""
        return json.loads(self.manifest.read_text())


def _stderr_progress(start: float) -> Progress:
    def say(msg: str) -> None:
        print(f"[vm image +{time.monotonic() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)
    return say


def is_static_elf(path: str) -> bool:
    """True if ``path`` is an ELF executable with no PT_INTERP (static)."""
    try:
        with open(path, "rb") as f:
            ehdr = f.read(64)
            if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:  # 64-bit only
                return False
            phoff, = struct.unpack_from("<Q", ehdr, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP: needs a dynamic loader
            return False
    return True


def host_busybox() -> Optional[Path]:
    """The host's static busybox (Debian package busybox-static), if any."""
    for cand in HOST_BUSYBOX_CANDIDATES:
        if os.path.isfile(cand) and is_static_elf(cand):
            return Path(cand)
    return None


def check_host_tools(arch: str, build: bool = True) -> None:
    """Raise one error naming every missing host tool.

    Raises:
        HostToolsMissing: with (tool, package) pairs.
    """
    spec = get_arch(arch)
    tools = dict(BUILD_TOOLS if build else RUN_TOOLS)
    tools[spec.qemu_binary] = "qemu-system-x86" if arch == "x86_64" else "qemu-system-arm"
    if build and is_foreign(spec):
        tools.update(FOREIGN_BUILD_TOOLS)
        tools[f"qemu-{arch}-static"] = "qemu-user-static"
    missing = [(t, pkg) for t, pkg in tools.items() if shutil.which(t) is None]
    if build and host_busybox() is None:
        missing.append(("busybox (static)", "busybox-static"))
    if missing:
        raise HostToolsMissing(missing)


def image_recipe(arch: str, kernel: str = R.DEFAULT_KERNEL,
                 distro: str = R.DEFAULT_DISTRO) -> Dict[str, object]:
    """The recipe dict of ``arch`` with guest distro ``distro`` and kernel
    ``kernel`` on this host (includes the busybox hash).

    The static busybox runs as the guest's init, so it must be built for
    the guest's arch: for a foreign arch it is taken out of the guest's own
    tree (Debian's busybox-static for that arch) and needs no host hash.

    Raises:
        HostToolsMissing: no static busybox on the host (native arch).
        VmError(kind="usage"): unknown distro or kernel choice.
    """
    spec = get_arch(arch)
    if is_foreign(spec):
        bb_hash = "guest:busybox-static"
    else:
        bb = host_busybox()
        if bb is None:
            raise HostToolsMissing([("busybox (static)", "busybox-static")])
        bb_hash = hashlib.sha256(bb.read_bytes()).hexdigest()
    return R.recipe(arch, spec.kernel_package, spec.initramfs_modules, bb_hash,
                    kernel=kernel, deb_arch=spec.deb_arch, foreign=is_foreign(spec), distro=distro)


def image_paths(arch: str, kernel: Optional[str] = None, distro: str = R.DEFAULT_DISTRO) -> ImagePaths:
    """Where the image of ``arch``/``distro``/``kernel`` (default: the
    distro's own kernel) for the current recipe is (or would be):
    ``<arch>[-<distro>]-<kernel>-<hash>`` (:func:`vm.recipe.axis_name`).

    Raises:
        VmError(kind="usage"): unknown distro or kernel choice.
    """
    kernel = kernel or R.default_kernel(distro)
    key = R.recipe_hash(image_recipe(arch, kernel, distro))
    return ImagePaths(images_dir() / f"{R.axis_name(arch, kernel, distro)}-{key}", arch, key, kernel, distro)


def host_mirrors(suite: str = R.SUITE, sources_root: str = "/etc/apt") -> List[str]:
    """Debian ``deb`` lines for ``suite`` from the host's apt sources.

    The host's mirror is the one known to work here; both the one-line
    format and deb822 ``.sources`` files are read. A suite the host does not
    list (a bookworm host building a trixie guest) takes the host's lines of
    its own release with the codename swapped (``bookworm-security`` on the
    security mirror -> ``trixie-security``; not backports, whose packages
    belong to their release). Falls back to deb.debian.org when the host
    lists no Debian release at all.
    """
    entries: List[tuple] = []  # (uri, suite, components)
    root = Path(sources_root)
    files = [root / "sources.list"] + sorted((root / "sources.list.d").glob("*"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: Dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    for s in fields.get("suites", "").split():
                        entries.append((uri, s, fields.get("components", "main")))
        elif path.name.endswith(".list"):
            for line in text.splitlines():
                line = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
                if len(line) >= 3 and line[0] == "deb":
                    entries.append((line[1], line[2], " ".join(line[3:]) or "main"))
    def of(release: str) -> List[tuple]:
        return [(uri, s) for uri, s, _ in entries
                if s == release or s.startswith(release + "-") or s.startswith(release + "/")]

    found = of(suite)
    if not any(s == suite for _, s in found):
        host_release = next((s for _, s in of(R.SUITE) if s == R.SUITE), "")
        found += [(uri, suite + s[len(host_release):]) for uri, s in of(host_release)
                  if host_release and not s.endswith("-backports")]
    lines = [f"deb {uri} {s} main" for uri, s in found]
    if not any(f" {suite} " in ln for ln in lines):
        lines = [f"deb http://deb.debian.org/debian {suite} main"] + lines
    return lines


def _customize(tree: Path, pubkey: str, busybox: Path) -> None:
    """Put the tiny init, sshd settings, key and ckpt wrapper into the tree."""
    crucible = tree / "usr/lib/crucible"
    (crucible / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, crucible / "busybox")
    os.symlink("../busybox", crucible / "bin/init")  # busybox picks the applet from argv[0]
    (crucible / "rc").write_text(R.RC)
    os.chmod(crucible / "rc", 0o755)
    (tree / "etc/inittab").write_text(R.INITTAB)
    (tree / "etc/hostname").write_text("crucible\n")
    (tree / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 crucible\n")
    (tree / "etc/resolv.conf").unlink(missing_ok=True)
    (tree / "etc/resolv.conf").write_text("nameserver 10.0.2.3\n")  # QEMU user-net DNS
    (tree / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (tree / "etc/ssh/sshd_config.d/crucible.conf").write_text(R.SSHD_CONFIG)
    ssh_dir = tree / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(pubkey)
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    (tree / "opt/crucible").mkdir(parents=True, exist_ok=True)
    wrapper = tree / "usr/local/bin/ckpt"
    wrapper.write_text(R.CKPT_WRAPPER)
    os.chmod(wrapper, 0o755)
    # sshd refuses even key logins for a locked account ("!" in shadow) when
    # UsePAM is off (sshd(8), auth.c allowed_user()): make root unlocked but
    # password-less ("*").
    shadow = tree / "etc/shadow"
    lines = shadow.read_text().splitlines()
    lines = [("root:*:" + ln.split(":", 2)[2]) if ln.startswith("root:") else ln for ln in lines]
    shadow.write_text("\n".join(lines) + "\n")
    if not (tree / "etc/ssh/ssh_host_ed25519_key").exists():
        subprocess.run(["ssh-keygen", "-A", "-f", str(tree)], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    for junk in ("var/cache/apt", "var/lib/apt/lists"):
        for p in (tree / junk).glob("*"):
            if p.is_file():
                p.unlink()


def _tree_size_kb(tree: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += max(st.st_blocks * 512, 4096)
    return total // 1024


def guest_busybox(tree: Path) -> Path:
    """The static busybox inside a foreign-arch tree (Debian busybox-static).

    Raises:
        VmError(kind="image"): not there, or not a static binary.
    """
    for rel in ("usr/bin/busybox", "bin/busybox"):
        cand = tree / rel
        if cand.is_file() and not cand.is_symlink() and is_static_elf(str(cand)):
            return cand
    raise VmError(f"no static busybox in {tree} (the rootfs recipe installs busybox-static "
                  "for foreign arches)", kind="image")


def build_image(arch: str, dest: ImagePaths, say: Progress, force_rootfs: bool = False) -> None:
    """Build into a temporary directory next to ``dest`` and rename it.

    The Debian tree comes from the cached rootfs tarball
    (:func:`vm.rootfs.ensure_rootfs`, built first if missing).

    Raises:
        VmError(kind="image"): any step failed (the partial build is removed).
        HostToolsMissing / VmError(kind="host-tools"): see ensure_rootfs.
    """
    spec = get_arch(arch)
    kernel_choice = dest.kernel_choice
    rec = image_recipe(arch, kernel_choice, dest.distro)
    t0 = time.monotonic()
    timings: Dict[str, float] = {}
    rootfs = ensure_rootfs(arch, kernel_choice, say=say, force=force_rootfs, distro=dest.distro)
    timings["rootfs_stage"] = time.monotonic() - t0
    tmp = dest.dir.parent / f".build-{dest.dir.name}"
    if tmp.exists():
        shutil.rmtree(tmp)  # a build interrupted earlier; we hold the lock
    tmp.mkdir()
    log = tmp / "build.log"
    try:
        say("ssh key: ed25519, per image")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"crucible-{dest.recipe_hash}",
                        "-f", str(tmp / "id_ed25519")], check=True, stdin=subprocess.DEVNULL)
        tree = tmp / "tree"
        tree.mkdir()
        say(f"unpacking the cached rootfs {rootfs.tar.name}")
        t = time.monotonic()
        # --numeric-owner: the tree's uids are the guest's, not the host's names.
        buildstep.run_step(["tar", "-C", str(tree), "-xpf", str(rootfs.tar), "--numeric-owner"],
                           log, say, "unpack")
        timings["unpack"] = time.monotonic() - t

        bb = guest_busybox(tree) if is_foreign(spec) else host_busybox()
        if bb is None:
            raise HostToolsMissing([("busybox (static)", "busybox-static")])
        say("customize: tiny init, sshd, key, ckpt wrapper")
        _customize(tree, (tmp / "id_ed25519.pub").read_text(), bb)

        kernels = sorted((tree / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise VmError(f"no kernel in {tree / 'boot'} after installing {spec.kernel_package}", kind="image")
        kernel = kernels[-1]
        release = kernel.name[len("vmlinuz-"):]
        shutil.copy2(kernel, tmp / "vmlinuz")
        say(f"initramfs: busybox + {', '.join(spec.initramfs_modules)} for {release}")
        (tmp / "initrd.img").write_bytes(
            build_initramfs(tree, release, spec.initramfs_modules, bb, R.INITRAMFS_INIT))

        size_kb = _tree_size_kb(tree) + R.HEADROOM_MB * 1024
        say(f"mke2fs -d: ext4 of {size_kb // 1024} MiB")
        t = time.monotonic()
        buildstep.run_step(["mke2fs", "-q", "-F", "-t", "ext4", "-m", "0", "-L", "crucible-root", "-d", str(tree),
                            str(tmp / "rootfs.ext4"), f"{size_kb}k"], log, say, "mke2fs")
        timings["mke2fs"] = time.monotonic() - t
        shutil.rmtree(tree)
        timings["total"] = time.monotonic() - t0
        rinfo = rootfs.info()
        timings["mmdebstrap"] = float(rinfo.get("mmdebstrap_seconds", 0.0))  # type: ignore[arg-type]
        manifest = {"arch": arch, "kernel": kernel_choice, "distro": dest.distro, "recipe_hash": dest.recipe_hash,
                    "rootfs_hash": rootfs.rootfs_hash, "kernel_release": release,
                    "rootfs_mb": size_kb // 1024,
                    "rootfs_allocated_mb": os.stat(tmp / "rootfs.ext4").st_blocks * 512 // 2**20,
                    "rootfs_tar_mb": rinfo.get("tar_mb"),
                    "initrd_kb": os.path.getsize(tmp / "initrd.img") // 1024,
                    "build_seconds": {k: round(v, 1) for k, v in timings.items()},
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "recipe.json").write_text(json.dumps(rec, indent=1, sort_keys=True))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if dest.dir.exists():  # --force: replace the old one
            shutil.rmtree(dest.dir)
        os.rename(tmp, dest.dir)
        say(f"image ready: {dest.dir} ({time.monotonic() - t0:.1f} s)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_image(arch: str = "x86_64", force: bool = False,
                 progress: Optional[Progress] = None, kernel: Optional[str] = None,
                 force_rootfs: bool = False, distro: str = R.DEFAULT_DISTRO) -> ImagePaths:
    """The image of ``arch`` with guest distro ``distro`` (a key of
    ``vm.recipe.DISTROS``: "bookworm" or "trixie") and kernel ``kernel`` (a
    key of ``DISTROS[distro]``: "6.1" or "backports" for bookworm, "6.12"
    for trixie; None: the distro's own) for the current recipe, built if
    missing. ``force`` rebuilds the image from the cached rootfs;
    ``force_rootfs`` redoes mmdebstrap too.

    Concurrent callers wait on a lock; one builds, the others reuse it.

    Raises:
        HostToolsMissing: a host tool needed to build is not installed.
        VmError(kind="unsupported"): arch not supported yet.
        VmError(kind="usage"): unknown distro or kernel choice.
        VmError(kind="image"): the build failed (log tail in the message).
    """
    get_arch(arch)
    force = force or force_rootfs
    dest = image_paths(arch, kernel, distro)
    if dest.exists() and not force:
        return dest
    check_host_tools(arch, build=True)
    say = progress or _stderr_progress(time.monotonic())
    lock_path = dest.dir.parent / f".lock-{dest.dir.name}"
    with open(lock_path, "w") as lock:
        if dest.exists() and not force:
            return dest
        say(f"taking the build lock {lock_path}")
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if dest.exists() and not force:
            say("another process built it meanwhile")
            return dest
        build_image(arch, dest, say, force_rootfs=force_rootfs)
    prune_old_images(arch, dest.kernel_choice, keep=dest.dir, distro=distro)
    return dest


def prune_old_images(arch: str, kernel: str, keep: Path, keep_count: int = 2,
                     distro: str = R.DEFAULT_DISTRO) -> None:
    """Delete all but the newest ``keep_count`` images of ``arch``/``distro``/``kernel``
    (``keep`` always stays): every recipe change would otherwise add ~400 MB.
    A guest still running on a deleted image is unaffected (its QEMU holds
    the files open; unlink(2) frees them only at close). Images named before
    the kernel axis (``<arch>-<hash>``) are left alone: a harness started
    earlier may still create overlays on them."""
    others = sorted((p for p in images_dir().glob(f"{R.axis_name(arch, kernel, distro)}-*") if p.is_dir() and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[max(0, keep_count - 1):]:
        shutil.rmtree(old, ignore_errors=True)
