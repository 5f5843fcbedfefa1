"""The guest image recipe: packages, the tiny init, sshd settings.

Everything that decides what ends up in the image lives here, and
:func:`recipe_hash` hashes all of it: change a line and the next
``ensure_image`` builds a new image under a new cache key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List

#: Bump when the build code changes what it produces for the same recipe.
BUILD_VERSION = 6
#: Bump when the rootfs stage (mmdebstrap -> tarball) changes its output.
ROOTFS_VERSION = 1

SUITE = "bookworm"

#: The guest-distro axis: Debian release -> its guest-kernel axis (choice ->
#: the suite its kernel package comes from). bookworm: "6.1" is its own
#: kernel, "backports" bookworm-backports' newer one (6.12 at the time of
#: writing) with the rest of the guest unchanged. trixie (Debian 13) brings
#: its own 6.12, python3.13 and criu 4.1: what people run today.
DEFAULT_DISTRO = SUITE
DISTROS: Dict[str, Dict[str, str]] = {
    "bookworm": {"6.1": "bookworm", "backports": "bookworm-backports"},
    "trixie": {"6.12": "trixie"},
}
#: Each distro's kernel when none is named (its own release's).
DEFAULT_KERNELS: Dict[str, str] = {"bookworm": "6.1", "trixie": "6.12"}
DEFAULT_KERNEL = DEFAULT_KERNELS[DEFAULT_DISTRO]
#: bookworm's kernel axis (the one before the distro axis existed).
KERNELS: Dict[str, str] = DISTROS[DEFAULT_DISTRO]


def check_distro(distro: str) -> str:
    """``distro`` itself when it is a known guest distro.

    Raises:
        VmError(kind="usage"): not a key of :data:`DISTROS`.
    """
    if distro not in DISTROS:
        from .errors import VmError
        raise VmError(f"unknown guest distro {distro!r}; known: {', '.join(DISTROS)}", kind="usage")
    return distro


def default_kernel(distro: str = DEFAULT_DISTRO) -> str:
    """The kernel choice of ``distro`` when none is given.

    Raises:
        VmError(kind="usage"): unknown distro.
    """
    return DEFAULT_KERNELS[check_distro(distro)]


def axis_name(arch: str, kernel: str, distro: str = DEFAULT_DISTRO) -> str:
    """``<arch>[-<distro>]-<kernel>``: the prefix of cache entries (images,
    rootfs tarballs) and report cells. bookworm, the distro that came
    first, keeps its old names, so its cached images stay valid."""
    return f"{arch}-{kernel}" if distro == DEFAULT_DISTRO else f"{arch}-{distro}-{kernel}"


#: The kernel's postinst runs update-initramfs (initramfs-tools satisfies its
#: dependency on linux-initramfs-tool). We boot our own tiny initramfs, and
#: under qemu-user a foreign-arch mkinitramfs costs minutes: divert the tool
#: to /bin/true before any package is installed (dpkg-divert(1) may divert a
#: path no package owns yet). Runs after the essential set, before --include.
ESSENTIAL_HOOK = ('chroot "$1" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs'
                  ' && ln -s /bin/true "$1/usr/sbin/update-initramfs"')

#: ``--variant=apt`` leaves out even ``mount``: list what we use explicitly.
PACKAGES: List[str] = [
    "python3", "openssh-server", "criu", "iproute2", "procps", "inotify-tools",
    "mount", "util-linux", "strace",
] + [
    # Real, unmodified programs the scenarios of scenarios/programs/ check
    # point (issues 11 and 12); each name is the same in bookworm and trixie.
    "redis-server",     # a key-value server with background threads
    "socat",            # a TCP relay
    "dnsmasq-base",     # a DNS forwarder over UDP (the binary, no service)
    "sqlite3",          # a database CLI holding its lock in a transaction
    "less", "vim-tiny",  # a pager and an editor driven through a pty
    "nginx",            # a pre-forking server: master + workers on one socket
    "xz-utils",         # xz -T2: a threaded compressor
]

#: Programs of our own (vm/programs/NAME.c), compiled inside the target
#: rootfs by its own gcc (so foreign-arch images get native binaries, through
#: qemu-user like everything else there) and installed in PROGRAMS_DIR; the
#: compiler is purged again in the same hook, so it costs no image space.
PROGRAMS_DIR = "/usr/lib/crucible/programs"
PROGRAMS: List[str] = ["cthreads"]
#: What compiling needs: in --include (apt resolves it with the rest), purged after.
PROGRAM_BUILD_PACKAGES: List[str] = ["gcc", "libc6-dev"]
#: Where the sources wait inside the tree while the hook compiles them.
PROGRAMS_SRC = "/usr/src/crucible-programs"

#: Free space left in the root filesystem for what scenarios write.
HEADROOM_MB = 768

#: Where the host's static busybox is installed inside the image; the tiny
#: init and its rc run on it, so the boot path execs nothing dynamic but sshd.
GUEST_BUSYBOX = "/usr/lib/crucible/busybox"

READY_MARKER = "CRUCIBLE-READY"

GUEST_IP = "10.0.2.15"

#: The initramfs ``/init``: load the virtio modules the cloud kernel builds as
#: modules, mount the root disk, hand over to the image's init. ``cinit`` is an
#: unknown ``name=value`` kernel parameter, which the kernel passes to init as
#: an environment variable (Documentation/admin-guide/kernel-parameters.rst).
INITRAMFS_INIT = r"""#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs devtmpfs /dev
for m in @MODULES@; do
  $B insmod /lib/modules/$m.ko || echo "crucible-initramfs: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i+1))
  if [ $i -gt 1000 ]; then echo "crucible-initramfs: no /dev/vda after 10 s"; $B poweroff -f; fi
  $B usleep 10000
done
$B mount -t ext4 -o rw,noatime /dev/vda /newroot || { echo "crucible-initramfs: cannot mount /dev/vda"; $B poweroff -f; }
$B mount --move /dev /newroot/dev
echo "crucible-initramfs: switch_root to ${cinit:-/usr/lib/crucible/bin/init}"
exec $B switch_root /newroot ${cinit:-/usr/lib/crucible/bin/init}
echo "crucible-initramfs: switch_root failed"
$B poweroff -f
"""

#: PID 1 is busybox init: it reaps every orphan (the engine restores processes
#: under their old PID, and a zombie would hold that PID), and handles
#: ``poweroff`` (SIGUSR2) by killing everything and powering off.
INITTAB = """::sysinit:/usr/lib/crucible/rc
::ctrlaltdel:/usr/lib/crucible/busybox poweroff
::shutdown:/usr/lib/crucible/busybox sync
"""

#: The boot script. Runs under busybox ash built with FEATURE_SH_STANDALONE,
#: so ``mount``, ``ip``, ``mkdir`` are busybox applets: no dynamic exec, which
#: under TCG costs 50-100 ms each. Only sshd is a real program.
RC = r"""#!/usr/lib/crucible/busybox sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /run/sshd /run/lock
echo crucible > /proc/sys/kernel/hostname
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
/usr/sbin/sshd || echo "crucible-init: sshd failed to start"
read up idle < /proc/uptime
echo "CRUCIBLE-READY uptime=$up"
"""

SSHD_CONFIG = """# Crucible guest: key-only root login, nothing slow at login.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
MaxSessions 64
MaxStartups 64
"""

#: ``ckpt`` in the guest: the engine is copied to /opt/crucible at launch.
CKPT_WRAPPER = """#!/bin/sh
PYTHONPATH=/opt/crucible${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH
exec python3 -m engine "$@"
"""

#: What Guest.install_engine puts in place of CKPT_WRAPPER at every launch
#: (not part of the recipe: a change here rebuilds no image). -S: no `site`
#: (the engine needs nothing but the standard library and PYTHONPATH, which
#: -S keeps): its .pth scan and imports cost every ckpt run ~15 ms of CPU
#: on the host and far more under TCG.
#: Not `-m engine`: the code (harness/zygote.py CODE) puts the engine's root
#: where -c/-m put the cwd (nothing in the cwd can shadow a module of a root
#: tool) and skips runpy's imports (~5 ms a run on a host, ~50 under TCG).
CKPT_WRAPPER_FAST = """#!/bin/sh
exec python3 -S -c 'import sys; sys.path[0] = "/opt/crucible"; import engine.__main__' "$@"
"""



def bundle_line(python: str, root: str) -> str:
    """The shell line that builds the engine's bundle under `root` (engine/bundle.py:
    its modules' code in one file, ~1.5 ms of each ckpt run's imports on a host)
    once its bytecode is in place; nothing for an engine without the builder."""
    return (f"if [ -f {root}/engine/mkbundle.py ]; then {python} -S -c "
            f"'import sys; sys.path[0] = \"{root}\"; from engine.mkbundle import main; main([])' >/dev/null; fi")


#: Shrink the tree: no docs, man pages or translations in a test guest.
DPKG_EXCLUDES = [
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
]


def kernel_suite(kernel: str, distro: str = DEFAULT_DISTRO) -> str:
    """The suite the kernel choice ``kernel`` of ``distro`` installs its package from.

    Raises:
        VmError(kind="usage"): unknown distro, or not one of its kernel choices.
    """
    kernels = DISTROS[check_distro(distro)]
    if kernel not in kernels:
        from .errors import VmError
        raise VmError(f"unknown guest kernel {kernel!r} for {distro}; known: {', '.join(kernels)}",
                      kind="usage")
    return kernels[kernel]


def kernel_include(kernel_package: str, kernel: str, distro: str = DEFAULT_DISTRO) -> str:
    """The ``--include`` entry for the kernel: ``pkg/suite`` when it comes
    from another suite (apt's release selector; apt then takes the
    dependencies that only that suite can satisfy from it too)."""
    suite = kernel_suite(kernel, distro)
    return kernel_package if suite == distro else f"{kernel_package}/{suite}"


#: A foreign-arch guest cannot run the host's busybox as its init: it gets
#: its own arch's static busybox from Debian, taken out of the tree.
FOREIGN_PACKAGES: List[str] = ["busybox-static"]


def program_source(name: str) -> Path:
    """The C source of one of :data:`PROGRAMS` in the repository."""
    return Path(__file__).resolve().parent / "programs" / f"{name}.c"


def programs_recipe() -> Dict[str, str]:
    """Each program's name -> sha256 of its source: an edit rebuilds the rootfs."""
    return {n: hashlib.sha256(program_source(n).read_bytes()).hexdigest() for n in PROGRAMS}


def programs_build_script() -> str:
    """The shell script the customize hook runs *inside* the tree (chroot):
    compile every program, then purge the compiler and what only it needed."""
    cc = "\n".join(f"gcc -O2 -Wall -pthread -o {PROGRAMS_DIR}/{n} {PROGRAMS_SRC}/{n}.c" for n in PROGRAMS)
    return ("set -e\n"
            f"mkdir -p {PROGRAMS_DIR}\n"
            f"{cc}\n"
            "export DEBIAN_FRONTEND=noninteractive\n"
            f"apt-get purge -y -q --autoremove {' '.join(PROGRAM_BUILD_PACKAGES)}\n"
            f"rm -rf {PROGRAMS_SRC}\n")


def rootfs_recipe(arch: str, deb_arch: str, kernel_package: str,
                  kernel: str = DEFAULT_KERNEL, foreign: bool = False,
                  distro: str = DEFAULT_DISTRO) -> Dict[str, object]:
    """What the mmdebstrap stage depends on (its own, longer-lived cache key:
    an arm64 rootfs takes ~20 min through qemu-user, so changing the init
    or the initramfs must not redo it). The distro is the ``suite`` (no key
    of its own: bookworm's dict, and so its hash, is what it was before the
    distro axis).

    Raises:
        VmError(kind="usage"): unknown distro or kernel choice.
    """
    suite = kernel_suite(kernel, distro)
    return {
        "rootfs_version": ROOTFS_VERSION,
        "arch": arch,
        "deb_arch": deb_arch,
        "suite": distro,
        "extra_suites": [suite] if suite != distro else [],
        "packages": sorted(PACKAGES + (FOREIGN_PACKAGES if foreign else []) + PROGRAM_BUILD_PACKAGES
                           + [kernel_include(kernel_package, kernel, distro)]),
        "programs": programs_recipe(),
        "programs_build": programs_build_script(),
        "dpkg_excludes": DPKG_EXCLUDES,
        "essential_hook": ESSENTIAL_HOOK,
    }


def recipe(arch: str, kernel_package: str, modules: List[str], busybox_sha256: str,
           kernel: str = DEFAULT_KERNEL, deb_arch: str = "", foreign: bool = False,
           distro: str = DEFAULT_DISTRO) -> Dict[str, object]:
    """Everything that determines the image, as one JSON-able dict.

    Raises:
        VmError(kind="usage"): unknown distro or kernel choice.
    """
    root = rootfs_recipe(arch, deb_arch or arch, kernel_package, kernel, foreign, distro)
    return {
        "build_version": BUILD_VERSION,
        "arch": arch,
        "kernel": kernel,
        "suite": distro,
        "rootfs": root,
        "rootfs_hash": recipe_hash(root),
        "packages": root["packages"],
        "initramfs_modules": list(modules),
        "initramfs_init": INITRAMFS_INIT,
        "inittab": INITTAB,
        "rc": RC,
        "sshd_config": SSHD_CONFIG,
        "ckpt_wrapper": CKPT_WRAPPER,
        "dpkg_excludes": DPKG_EXCLUDES,
        "headroom_mb": HEADROOM_MB,
        "busybox_sha256": busybox_sha256,
    }


def recipe_hash(rec: Dict[str, object]) -> str:
    """A short stable hash of :func:`recipe`'s result (the cache key)."""
    blob = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
