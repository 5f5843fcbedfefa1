"""Per-architecture pieces of the guest: QEMU binary, machine, CPU, kernel.

Each supported arch is a small class whose methods return ``list[str]``
fragments (the virtme-ng way). An arch we do not support yet is an explicit
``VmError(kind="unsupported")``, never a silent fallback to x86_64.
"""

from __future__ import annotations

from typing import Dict, List, Type

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

    def machine_args(self, accel: str, tb_size_mb: int) -> List[str]:
        """``-machine``/``-accel``/``-cpu`` for the chosen accelerator."""
        raise NotImplementedError

    def disk_args(self, overlay: str) -> List[str]:
        """The root disk: virtio-blk (an NVMe root cannot be snapshotted)."""
        raise NotImplementedError

    def net_args(self, ssh_port: int) -> List[str]:
        """User networking with SSH forwarded from 127.0.0.1 only."""
        raise NotImplementedError


class X86_64(ArchSpec):
    name = "x86_64"
    qemu_binary = "qemu-system-x86_64"
    deb_arch = "amd64"
    kernel_package = "linux-image-cloud-amd64"
    console = "ttyS0"
    initramfs_modules = ["virtio_pci", "virtio_blk", "virtio_net"]

    def machine_args(self, accel: str, tb_size_mb: int) -> List[str]:
        if accel == "kvm":
            return ["-machine", "pc", "-accel", "kvm", "-cpu", "host"]
        if accel == "tcg":
            # tb-size caps the translation cache (QEMU's default is 1 GiB
            # per guest, most of a TCG guest's host memory).
            # -cpu max gives the guest XSAVE/AVX, as real hosts have: the
            # engine's FPU-state code must meet what it meets in production.
            return ["-machine", "pc", "-accel", f"tcg,tb-size={tb_size_mb}", "-cpu", "max"]
        raise VmError(f"unknown accelerator {accel!r} (want kvm or tcg)", kind="usage")

    def disk_args(self, overlay: str) -> List[str]:
        # cache=unsafe: the overlay is thrown away with the guest; savevm
        # flushes explicitly, so snapshots stay consistent.
        return ["-drive", f"file={overlay},if=none,id=root,format=qcow2,cache=unsafe,discard=unmap",
                "-device", "virtio-blk-pci,drive=root"]

    def net_args(self, ssh_port: int) -> List[str]:
        # romfile= : no iPXE option ROM to load, we boot with -kernel.
        return ["-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
                "-device", "virtio-net-pci,netdev=net0,romfile="]


class Aarch64(ArchSpec):
    """Planned (qemu-system-aarch64, virt machine, ttyAMA0); not wired yet."""

    name = "aarch64"


ARCHES: Dict[str, Type[ArchSpec]] = {"x86_64": X86_64, "aarch64": Aarch64}
SUPPORTED = ("x86_64",)


def get_arch(name: str) -> ArchSpec:
    """The spec for ``name``.

    Raises:
        VmError(kind="unsupported"): a known arch not wired yet (aarch64).
        VmError(kind="usage"): an arch name we know nothing about.
    """
    if name not in ARCHES:
        raise VmError(f"unknown arch {name!r}; known: {', '.join(sorted(ARCHES))}", kind="usage")
    if name not in SUPPORTED:
        raise VmError(f"arch {name} is not supported yet (supported: {', '.join(SUPPORTED)})",
                      kind="unsupported")
    return ARCHES[name]()
