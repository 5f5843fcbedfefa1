"""QEMU's command line as ``list[str]``, from per-arch pieces. Never a shell string."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .arch import ArchSpec

#: Kernel parameters. panic=-1 reboots at once on a panic and -no-reboot turns
#: that into a QEMU exit, so a broken boot ends instead of hanging.
#: mitigations=off: speculative-execution fences only cost time under TCG.
#: The virtio-serial port name of the harness's in-guest agent (harness/agent.py).
AGENT_PORT = "org.crucible.agent"

BASE_APPEND = ["quiet", "panic=-1", "mitigations=off", "no_timer_check", "i8042.noaux", "i8042.nokbd"]


@dataclass
class LaunchSpec:
    """Everything one QEMU invocation depends on."""

    name: str
    kernel: str
    initrd: str
    overlay: str
    accel: str
    ssh_port: int
    qmp_socket: str
    serial_log: str
    memory_mb: int = 512
    smp: int = 1
    tb_size_mb: int = 128
    loadvm: Optional[str] = None
    extra_append: List[str] = field(default_factory=list)
    #: ``uname -r`` of the image's kernel ("" unknown): some CPU flags depend on it
    kernel_release: str = ""
    #: host end (a unix socket QEMU listens on) of the virtio-serial port
    #: ``org.crucible.agent`` the harness's in-guest agent talks over; None: no port
    agent_socket: Optional[str] = None
    #: a second NIC on an L2 segment shared with another guest: (this end's
    #: unix datagram socket, the other guest's, this NIC's MAC). QEMU's
    #: ``-netdev dgram`` sends each frame to the other end's socket; no
    #: privilege, no host interface. None: no such NIC.
    segment: Optional[Tuple[str, str, str]] = None


def kernel_append(arch: ArchSpec, extra: List[str]) -> str:
    """The ``-append`` string: console on the arch's serial port first."""
    return " ".join([f"console={arch.console}"] + BASE_APPEND + list(extra))


def build_argv(arch: ArchSpec, spec: LaunchSpec) -> List[str]:
    """The full argv for ``spec``; the device list is identical with or
    without ``loadvm`` (a snapshot only loads into the same devices).

    Raises:
        VmError(kind="usage"): unknown accelerator.
    """
    argv = [arch.qemu_binary, "-name", f"crucible-{spec.name}",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    argv += arch.machine_args(spec.accel, spec.tb_size_mb, spec.kernel_release)
    argv += ["-m", str(spec.memory_mb), "-smp", str(spec.smp), "-rtc", "base=utc"]
    argv += ["-kernel", spec.kernel, "-initrd", spec.initrd,
             "-append", kernel_append(arch, spec.extra_append)]
    argv += arch.disk_args(spec.overlay)
    argv += arch.net_args(spec.ssh_port)
    argv += ["-chardev", f"file,id=serial0,path={spec.serial_log}", "-serial", "chardev:serial0"]
    argv += ["-qmp", f"unix:{spec.qmp_socket},server=on,wait=off"]
    if spec.agent_socket:
        # A chardev is host state, not guest state: the connection to it
        # survives a loadvm (an SSH connection does not).
        argv += ["-device", "virtio-serial-pci,id=vser0",
                 "-chardev", f"socket,id=agent0,path={spec.agent_socket},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT}"]
    if spec.segment:
        local, remote, mac = spec.segment
        argv += ["-netdev", f"dgram,id=seg0,local.type=unix,local.path={local},"
                            f"remote.type=unix,remote.path={remote}",
                 "-device", f"virtio-net-pci,netdev=seg0,romfile=,mac={mac}"]
    if spec.loadvm:
        argv += ["-loadvm", spec.loadvm]
    return argv
