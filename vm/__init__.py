"""Crucible's guest VMs: build a Debian image, boot QEMU guests, drive them.

Public API (what the scenario harness uses)::

    from vm import Guest, VmError, ensure_image, ImagePaths
    img = ensure_image("x86_64", kernel="6.1")   # arch: x86_64 | aarch64; kernel: 6.1 | backports
                                   # builds if missing; cached under
                                   # ${CRUCIBLE_CACHE:-~/.cache/crucible}/images/<arch>-<kernel>-<recipe-hash>/
    with Guest(arch="x86_64", accel="auto", name="w0", log_dir="reports/guests", image=img,
               memory_mb=512, engine_dir="/work/main/engine") as g:
        res = g.run("ls /", timeout=30)    # RunResult(rc, stdout, stderr, duration); rc != 0 is not an error
        res = g.run(["python3", "-c", "print(1)"], timeout=30)   # list form is shlex-quoted
        g.run("...", timeout=30, check=True)   # VmError(kind="command") with rc/stdout/stderr if rc != 0
        g.put(local_path, remote_path); g.get(remote_path, local_path)
        g.put_bytes(data, remote_path); g.get_bytes(remote_path) -> bytes
        g.snapshot("golden"); g.revert("golden")   # savevm/loadvm; revert reconnects SSH
        g.serial_tail(lines=40); g.ssh_command(); g.alive()
        g.shutdown(hard=False, timeout=30)         # idempotent; always reaps QEMU

``Guest(..., kernel="backports")`` without ``image`` builds/uses that
kernel's image; with ``image`` the kernel is the image's (``kernel_choice``).

Guest(...).launch() boots on a private qcow2 overlay of the image, waits for
the readiness line on the serial console and for SSH (127.0.0.1, free port),
then copies ``engine_dir`` to /opt/crucible/engine (``ckpt`` in the guest runs
``python3 -m engine`` from there). ``Guest(from_snapshot=(overlay, tag))``
starts from a copy of an overlay saved with :meth:`Guest.export_overlay`,
with ``-loadvm tag`` (no boot, no engine install: the snapshot has it).

Errors are :class:`VmError` (one root), with ``kind`` one of launch, timeout,
died, command, ssh, qmp, image, host-tools, unsupported, usage.

Command line: ``python3 -m vm {image,shell,show-command,probe-accel,cache-key,bench}``.
"""

from __future__ import annotations

from .errors import HostToolsMissing, VmError
from .guest import Guest
from .image import ImagePaths, ensure_image
from .ssh import RunResult

__all__ = ["Guest", "VmError", "HostToolsMissing", "ensure_image", "ImagePaths", "RunResult"]
