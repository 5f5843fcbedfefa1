"""Per-architecture pieces of the guest: QEMU binary, machine, CPU, kernel.

Each supported arch is a small class whose methods return ``list[str]``
fragments (the virtme-ng way). An arch we do not support yet is an explicit
``VmError(kind="unsupported")``, never a silent fallback to x86_64.
"""

from __future__ import annotations

from typing import Dict, List, Tuple, Type

from .errors import VmError


class ArchSpec:
    """What differs between architectures. Subclasses fill in the blanks."""

    name = ""
    qemu_binary = ""
    deb_arch = ""
    kernel_package = ""
    console = ""
    #: Modules the kernel lacks built in but a virtio-blk root needs; their
    #: dependencies are resolved from modules.dep at build time.
    initramfs_modules: List[str] = []

    def machine_args(self, accel: str, tb_size_mb: int, kernel_release: str = "") -> List[str]:
        """``-machine``/``-accel``/``-cpu`` for the chosen accelerator and
        the guest kernel (``uname -r`` of the image; "" when unknown)."""
        raise NotImplementedError

    def disk_args(self, overlay: str) -> List[str]:
        """The root disk: virtio-blk (an NVMe root cannot be snapshotted).

        Every arch we run has a PCI(e) host bridge (x86_64 ``pc``, aarch64
        ``virt``), so the same virtio-pci devices serve all of them and keep
        the snapshot device list alike."""
        # cache=unsafe: the overlay is thrown away with the guest; savevm
        # flushes explicitly, so snapshots stay consistent.
        return ["-drive", f"file={overlay},if=none,id=root,format=qcow2,cache=unsafe,discard=unmap",
                "-device", "virtio-blk-pci,drive=root"]

    def net_args(self, ssh_port: int) -> List[str]:
        """User networking with SSH forwarded from 127.0.0.1 only."""
        # romfile= : no iPXE option ROM to load, we boot with -kernel.
        return ["-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
                "-device", "virtio-net-pci,netdev=net0,romfile="]

    def kvm_possible(self) -> bool:
        """Whether KVM can run this arch on this host at all (same arch)."""
        import platform
        return platform.machine() == self.name


#: x86_64 guest kernels from this release on get ``-cpu max,-cx16`` under TCG.
TCG_NO_CX16_FROM = (6, 5)


def release_at_least(release: str, version: Tuple[int, int]) -> bool:
    """``6.12.95+deb12-cloud-amd64`` >= (6, 5)? False for "" or garbage."""
    parts = release.split(".")
    try:
        return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)) >= version
    except (IndexError, ValueError):
        return False


class X86_64(ArchSpec):
    name = "x86_64"
    qemu_binary = "qemu-system-x86_64"
    deb_arch = "amd64"
    kernel_package = "linux-image-cloud-amd64"
    console = "ttyS0"
    initramfs_modules = ["virtio_pci", "virtio_blk", "virtio_net"]

    def machine_args(self, accel: str, tb_size_mb: int, kernel_release: str = "") -> List[str]:
        if accel == "kvm":
            return ["-machine", "pc", "-accel", "kvm", "-cpu", "host"]
        if accel == "tcg":
            # tb-size caps the translation cache (QEMU's default is 1 GiB
            # per guest, most of a TCG guest's host memory).
            # -cpu max gives the guest XSAVE/AVX, as real hosts have: the
            # engine's FPU-state code must meet what it meets in production.
            cpu = "max"
            if release_at_least(kernel_release, TCG_NO_CX16_FROM):
                # Measured here: bookworm-backports' 6.12 under QEMU 7.2 TCG
                # double-faults at boot in kmem_cache_alloc on a
                # gs:cmpxchg16b (SLUB's per-cpu cmpxchg128 fast path, Linux
                # >= 6.5) in ~5 of 7 boots; with CX16 hidden SLUB takes its
                # other path and 4 of 4 boots were clean. 6.1 boots fine
                # with plain max, so it keeps the full CPU.
                cpu = "max,-cx16"
            return ["-machine", "pc", "-accel", f"tcg,tb-size={tb_size_mb}", "-cpu", cpu]
        raise VmError(f"unknown accelerator {accel!r} (want kvm or tcg)", kind="usage")


class Aarch64(ArchSpec):
    """arm64 on ``qemu-system-aarch64 -M virt`` (TCG only on an x86_64 host).

    Debian's arm64 kernel builds nearly everything as a module, ext4 too, so
    the initramfs carries the root-mount path: virtio_pci, virtio_blk,
    virtio_net, ext4, and crc32c_generic (ext4's metadata checksums ask the
    crypto API for "crc32c"; without a provider the mount fails).
    """

    name = "aarch64"
    qemu_binary = "qemu-system-aarch64"
    deb_arch = "arm64"
    kernel_package = "linux-image-arm64"
    console = "ttyAMA0"  # the virt machine's PL011 UART
    initramfs_modules = ["virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4"]

    def machine_args(self, accel: str, tb_size_mb: int, kernel_release: str = "") -> List[str]:
        if accel == "kvm":
            # KVM runs only same-arch guests; this host is x86_64.
            raise VmError("aarch64 guests cannot use KVM on this host (KVM needs an arm64 host); "
                          "use --accel tcg or auto", kind="usage")
        if accel == "tcg":
            # pauth-impdef=on: -cpu max emulates pointer authentication with
            # QARMA by default, which costs TCG a lot on every function
            # return; the IMPDEF algorithm keeps the feature (the guest still
            # sees PAC) at a fraction of the cost (QEMU docs
            # system/arm/cpu-features.rst). Measured: ~4.5 s vs ~11 s to SSH.
            return ["-machine", "virt", "-accel", f"tcg,tb-size={tb_size_mb}",
                    "-cpu", "max,pauth-impdef=on"]
        raise VmError(f"unknown accelerator {accel!r} (want kvm or tcg)", kind="usage")


ARCHES: Dict[str, Type[ArchSpec]] = {"x86_64": X86_64, "aarch64": Aarch64}
SUPPORTED = ("x86_64", "aarch64")


def get_arch(name: str) -> ArchSpec:
    """The spec for ``name``.

    Raises:
        VmError(kind="unsupported"): a known arch not wired yet.
        VmError(kind="usage"): an arch name we know nothing about.
    """
    if name not in ARCHES:
        raise VmError(f"unknown arch {name!r}; known: {', '.join(sorted(ARCHES))}", kind="usage")
    if name not in SUPPORTED:
        raise VmError(f"arch {name} is not supported yet (supported: {', '.join(SUPPORTED)})",
                      kind="unsupported")
    return ARCHES[name]()
