"""A booted guest kept between runs: each worker's guests start from it
(QEMU ``-loadvm``) instead of booting.

Why: a guest's boot to an SSH command took 4-15 s of TCG CPU (idle to
loaded) for every worker's guest of every run, to reach the very same
state each time: the image's kernel and init up, sshd answering, nothing
of ours in it yet. So the first boot's overlay, snapshotted there
(internal snapshot :data:`TAG`), is kept under the image cache and copied
for the next guests (vm/guest.py ``from_snapshot``); the engine, the guest
files, the agent and the golden snapshot come after, every time, as
before.

Nothing stale can be loaded: the file is found by :func:`key`, the
identity of everything the booted state depends on - the image's files and
manifest, the QEMU binary and its firmware files, the accelerator, the whole QEMU command line but
its per-run host paths and port (memory, CPUs, devices, the segment NIC's
MAC: a worker's "b" guest has its own, and so its own boot and boot id),
and the vm code that boots and waits. Any change is another file (a slot keeps its
newest :data:`KEEP`); a kept file that does not load is
removed and the guest boots.

What it changes: guests of the same key start from one boot instead of one
each (the same kernel address-space layout and boot id for a worker's "a"
guests across workers and runs; the "a" and "b" guests of a worker still
differ); the clock is set after the load (vm/guest.py sync_clock).
``CRUCIBLE_BOOT_CACHE=0`` boots every guest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Tuple

TAG = "crucible-booted"
KEEP = 2            # kept boots per slot (~110 MiB each)


def enabled() -> bool:
    return os.environ.get("CRUCIBLE_BOOT_CACHE", "1") != "0"


def _file_id(p: Path) -> str:
    st = Path(p).resolve().stat()
    return f"{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def firmware_ids(qemu_binary: str) -> List[str]:
    """The identity of every file in QEMU's firmware directories (its
    ``-L help``: the BIOS and option ROMs a booted state was started with)."""
    import subprocess
    try:
        out = subprocess.run([qemu_binary, "-L", "help"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ["no firmware list"]
    ids = []
    for d in out.split():
        for p in sorted(Path(d).rglob("*")) if Path(d).is_dir() else []:
            try:
                if p.is_file():
                    ids.append(_file_id(p))
            except OSError:
                pass
    return ids


def key(image, qemu_binary: str, accel: str, argv: list) -> str:
    """The booted state's identity (see the module doc); ``argv`` is QEMU's
    command line with its per-run host paths and port replaced by
    placeholders (:func:`placeholder_argv`)."""
    h = hashlib.sha256()
    parts = [_file_id(image.kernel), _file_id(image.initrd), _file_id(image.rootfs),
             json.dumps(image.info(), sort_keys=True), _file_id(Path(shutil.which(qemu_binary) or qemu_binary)),
             accel, json.dumps(argv)] + firmware_ids(shutil.which(qemu_binary) or qemu_binary)
    vm = Path(__file__).resolve().parent.parent / "vm"
    for p in parts:
        h.update(p.encode() + b"\0")
    for name in ("guest.py", "argv.py", "ssh.py", "qmp.py"):
        h.update((vm / name).read_bytes() + b"\0")
    return h.hexdigest()[:24]


def placeholder_argv(guest) -> list:
    """The QEMU command line ``guest`` (not launched) would get, with the
    per-run host paths and port as fixed placeholders."""
    from vm.arch import get_arch
    from vm.argv import LaunchSpec, build_argv
    seg = guest.segment
    spec = LaunchSpec(name="NAME", kernel=str(guest.image.kernel), initrd=str(guest.image.initrd),
                      overlay="OVERLAY", accel=guest.accel_requested, ssh_port=1, qmp_socket="QMP",
                      serial_log="SERIAL", memory_mb=guest.memory_mb, smp=guest.smp, tb_size_mb=guest.tb_size_mb,
                      loadvm=None, extra_append=list(guest.extra_append), kernel_release=guest._kernel_release(),
                      agent_socket="AGENT", segment=("SEG-HERE", "SEG-THERE", seg[2]) if seg else None)
    assert {f.name for f in dataclasses.fields(LaunchSpec)} == {
        "name", "kernel", "initrd", "overlay", "accel", "ssh_port", "qmp_socket", "serial_log", "memory_mb", "smp",
        "tb_size_mb", "loadvm", "extra_append", "kernel_release", "agent_socket", "segment"}, \
        "LaunchSpec changed: say here which of its fields are per-run host state"
    return build_argv(get_arch(guest.arch), spec)


def launch(make: Callable[[Optional[Tuple[str, str]]], object], root: Path, slot: str,
           key_of: Callable[[object], str]) -> Tuple[object, str]:
    """A launched guest and how: ``"loaded"`` (from the kept boot), ``"booted"``
    (and kept for next time) or ``"booted: <why not kept>"``.
    ``make(from_snapshot)`` builds the (not launched) Guest; ``slot`` names
    what one kept file stands for (arch, distro, kernel, guest letter)."""
    from vm import VmError
    probe = make(None)
    k = key_of(probe)
    path = Path(root) / f"{slot}-{k}.qcow2"
    console = path.with_suffix(".console")
    if path.exists():
        g = make((str(path), TAG))
        try:     # its console starts with the kept boot's: a crash report shows the guest's boot too
            g.console_before = (f"[crucible: loaded from the kept boot {path.name}, whose console was:]\n"
                                + console.read_text(errors="replace").rstrip("\n")
                                + "\n[crucible: loaded here; this guest's own console follows]")
        except OSError:
            pass
        try:
            g.__enter__()
            return g, "loaded"
        except VmError as e:
            path.unlink(missing_ok=True)     # a kept boot that does not load is not kept
            console.unlink(missing_ok=True)
            print(f"\ncrucible: the kept boot {path.name} did not load ({e}); booting")
    probe.__enter__()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        probe.snapshot(TAG)
        Path(root).mkdir(parents=True, exist_ok=True)
        ctmp = console.with_name(f".{console.name}.{os.getpid()}")
        ctmp.write_text(probe.serial_tail(1000))
        os.replace(ctmp, console)
        probe.export_overlay(tmp)
        os.replace(tmp, path)
        # the slot's newest KEEP stay (two checkouts at different vm code
        # take turns without booting every time), the older ones go
        kept = sorted(Path(root).glob(f"{slot}-*.qcow2"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in [p for p in kept if p != path][KEEP - 1:]:
            old.unlink(missing_ok=True)
        for c in Path(root).glob(f"{slot}-*.console"):
            if not c.with_suffix(".qcow2").exists():
                c.unlink(missing_ok=True)
    except (VmError, OSError) as e:
        tmp.unlink(missing_ok=True)
        if not path.exists():
            console.unlink(missing_ok=True)
        return probe, f"booted: not kept ({e})"
    return probe, "booted"
