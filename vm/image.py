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

from . import recipe as R
from .arch import get_arch
from .errors import HostToolsMissing, VmError
from .initramfs import build_initramfs
from .paths import images_dir

Progress = Callable[[str], None]

#: host tool -> the Debian package that provides it
BUILD_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "mke2fs": "e2fsprogs",
    "ssh-keygen": "openssh-client",
    "qemu-img": "qemu-utils",
}
RUN_TOOLS = {"qemu-img": "qemu-utils"}
HOST_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


@dataclass(frozen=True)
class ImagePaths:
    """The files of one built image."""

    dir: Path
    arch: str
    recipe_hash: str

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
    missing = [(t, pkg) for t, pkg in tools.items() if shutil.which(t) is None]
    if build and host_busybox() is None:
        missing.append(("busybox (static)", "busybox-static"))
    if missing:
        raise HostToolsMissing(missing)


def image_recipe(arch: str) -> Dict[str, object]:
    """The recipe dict of ``arch`` on this host (includes the busybox hash).

    Raises:
        HostToolsMissing: no static busybox on the host.
    """
    spec = get_arch(arch)
    bb = host_busybox()
    if bb is None:
        raise HostToolsMissing([("busybox (static)", "busybox-static")])
    bb_hash = hashlib.sha256(bb.read_bytes()).hexdigest()
    return R.recipe(arch, spec.kernel_package, spec.initramfs_modules, bb_hash)


def image_paths(arch: str) -> ImagePaths:
    """Where the image of ``arch`` for the current recipe is (or would be)."""
    key = R.recipe_hash(image_recipe(arch))
    return ImagePaths(images_dir() / f"{arch}-{key}", arch, key)


def host_mirrors(suite: str = R.SUITE, sources_root: str = "/etc/apt") -> List[str]:
    """Debian ``deb`` lines for ``suite`` from the host's apt sources.

    The host's mirror is the one known to work here; both the one-line
    format and deb822 ``.sources`` files are read. Falls back to
    deb.debian.org when the host lists none for that suite.
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
    lines = []
    for uri, s, comps in entries:
        if s == suite or s.startswith(suite + "-") or s.startswith(suite + "/"):
            lines.append(f"deb {uri} {s} main")
    if not any(f" {suite} " in ln for ln in lines):
        lines = [f"deb http://deb.debian.org/debian {suite} main"] + lines
    return lines


def _run(argv: List[str], log: Path, say: Progress, stage: str) -> None:
    """Run a build step, output to the build log, a heartbeat every 15 s.

    Raises:
        VmError(kind="image"): non-zero exit, with the log's tail.
    """
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        try:
            while True:
                try:
                    rc = proc.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    say(f"{stage}: still running ({time.monotonic() - t0:.0f} s)")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise VmError(f"image build step {stage} failed (log: {log})", kind="image",
                      command=argv, rc=rc, stderr=tail)


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


def build_image(arch: str, dest: ImagePaths, say: Progress) -> None:
    """Build into a temporary directory next to ``dest`` and rename it.

    Raises:
        VmError(kind="image"): any step failed (the partial build is removed).
    """
    spec = get_arch(arch)
    rec = image_recipe(arch)
    bb = host_busybox()
    assert bb is not None  # image_recipe checked
    tmp = dest.dir.parent / f".build-{dest.dir.name}"
    if tmp.exists():
        shutil.rmtree(tmp)  # a build interrupted earlier; we hold the lock
    tmp.mkdir()
    log = tmp / "build.log"
    t0 = time.monotonic()
    timings: Dict[str, float] = {}
    try:
        say("ssh key: ed25519, per image")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"crucible-{dest.recipe_hash}",
                        "-f", str(tmp / "id_ed25519")], check=True, stdin=subprocess.DEVNULL)
        tree = tmp / "tree"
        mirrors = host_mirrors()
        say(f"mmdebstrap {R.SUITE} --variant=apt ({len(rec['packages'])} packages) from {mirrors[0].split()[1]}")
        t = time.monotonic()
        argv = ["mmdebstrap", "--variant=apt", f"--architectures={spec.deb_arch}",
                "--include=" + ",".join(rec["packages"]),  # type: ignore[arg-type]
                '--aptopt=APT::Install-Recommends "false"']
        argv += [f"--dpkgopt={d}" for d in R.DPKG_EXCLUDES]
        argv += [R.SUITE, str(tree)] + mirrors
        _run(argv, log, say, "mmdebstrap")
        timings["mmdebstrap"] = time.monotonic() - t
        say(f"mmdebstrap done ({timings['mmdebstrap']:.1f} s)")

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
        _run(["mke2fs", "-q", "-F", "-t", "ext4", "-m", "0", "-L", "crucible-root", "-d", str(tree),
              str(tmp / "rootfs.ext4"), f"{size_kb}k"], log, say, "mke2fs")
        timings["mke2fs"] = time.monotonic() - t
        shutil.rmtree(tree)
        timings["total"] = time.monotonic() - t0
        manifest = {"arch": arch, "recipe_hash": dest.recipe_hash, "kernel_release": release,
                    "rootfs_mb": size_kb // 1024,
                    "rootfs_allocated_mb": os.stat(tmp / "rootfs.ext4").st_blocks * 512 // 2**20,
                    "initrd_kb": os.path.getsize(tmp / "initrd.img") // 1024,
                    "build_seconds": {k: round(v, 1) for k, v in timings.items()},
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "recipe.json").write_text(json.dumps(rec, indent=1, sort_keys=True))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if dest.dir.exists():  # --force: replace the old one
            shutil.rmtree(dest.dir)
        os.rename(tmp, dest.dir)
        say(f"image ready: {dest.dir} ({timings['total']:.1f} s)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_image(arch: str = "x86_64", force: bool = False,
                 progress: Optional[Progress] = None) -> ImagePaths:
    """The image of ``arch`` for the current recipe, built if missing.

    Concurrent callers wait on a lock; one builds, the others reuse it.

    Raises:
        HostToolsMissing: a host tool needed to build is not installed.
        VmError(kind="unsupported"): arch not supported yet.
        VmError(kind="image"): the build failed (log tail in the message).
    """
    get_arch(arch)
    dest = image_paths(arch)
    if dest.exists() and not force:
        return dest
    check_host_tools(arch, build=True)
    say = progress or _stderr_progress(time.monotonic())
    lock_path = dest.dir.parent / f".lock-{dest.dir.name}"
    with open(lock_path, "w") as lock:
        if dest.exists() and not force:
            return dest
        say(f"waiting for the build lock {lock_path}")
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if dest.exists() and not force:
            say("another process built it meanwhile")
            return dest
        build_image(arch, dest, say)
    return dest
