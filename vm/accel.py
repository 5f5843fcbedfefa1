"""Choose KVM or TCG: KVM only when a short probe boot actually works.

Here ``/dev/kvm`` exists but a KVM guest hangs right after the kernel starts
(no nested virtualisation): opening /dev/kvm is not proof. ``auto`` boots a
probe guest under KVM with a short readiness timeout; the verdict is cached
per host (kernel release + QEMU version) so it is paid once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

from .errors import VmError
from .paths import cache_dir, read_json_object, replace_text

#: Under KVM the guest is ready in well under a second; 12 s is plenty and
#: bounds the cost of a hanging KVM.
PROBE_TIMEOUT = 12.0

ProbeFn = Callable[[], Tuple[bool, str]]


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator to use and why (said to the user)."""

    accel: str
    reason: str
    cached: bool = False


def kvm_openable(dev: str = "/dev/kvm") -> bool:
    """True if ``dev`` exists and opens read-write (what QEMU needs)."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def host_key(qemu_binary: str) -> str:
    """Identity of this host for the cached verdict: kernel release + QEMU version."""
    try:
        out = subprocess.run([qemu_binary, "--version"], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        out = "unknown-qemu"
    return f"{platform.release()} | {out.strip()}"


def probe_cache_path() -> Path:
    return cache_dir() / "accel-probe.json"


def load_cached(path: Path, key: str) -> Optional[dict]:
    """The cached verdict for ``key``, or None (missing/corrupt file)."""
    entry = read_json_object(path).get(hashlib.sha256(key.encode()).hexdigest()[:16])
    return entry if isinstance(entry, dict) and entry.get("accel") in ("kvm", "tcg") else None


def store_cached(path: Path, key: str, accel: str, detail: str) -> None:
    """Record a verdict (atomic replace, other hosts' entries kept)."""
    table = read_json_object(path)
    table[hashlib.sha256(key.encode()).hexdigest()[:16]] = {
        "host": key, "accel": accel, "detail": detail,
        "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    replace_text(path, json.dumps(table, indent=1))


def decide(requested: str, *, kvm_present: bool, key: str, cache_path: Path,
           probe: ProbeFn, refresh: bool = False) -> AccelChoice:
    """The decision logic, with every input injectable (tests use fakes).

    Raises:
        VmError(kind="usage"): ``requested`` is not auto/kvm/tcg, or kvm
            was asked for and /dev/kvm cannot be opened.
    """
    if requested == "tcg":
        return AccelChoice("tcg", "requested --accel tcg")
    if requested == "kvm":
        if not kvm_present:
            raise VmError("--accel kvm requested but /dev/kvm cannot be opened", kind="usage")
        return AccelChoice("kvm", "requested --accel kvm (not probed)")
    if requested != "auto":
        raise VmError(f"unknown --accel {requested!r}: want auto, kvm or tcg", kind="usage")
    if not kvm_present:
        return AccelChoice("tcg", "auto: /dev/kvm missing or not openable")
    if not refresh:
        hit = load_cached(cache_path, key)
        if hit is not None:
            return AccelChoice(hit["accel"], f"auto (cached probe): {hit.get('detail', '')}", cached=True)
    ok, detail = probe()
    accel = "kvm" if ok else "tcg"
    store_cached(cache_path, key, accel, detail)
    return AccelChoice(accel, f"auto (probed now): {detail}")


def probe_kvm_boot(arch: str, image: object, timeout: float = PROBE_TIMEOUT) -> Tuple[bool, str]:
    """Boot a guest under KVM and wait for its readiness line (no SSH).

    Never raises for a failed boot: that is the answer ("False, why").
    """
    from .guest import Guest  # guest imports us for auto; import late

    print(f"[vm] probing KVM: short boot, {timeout:g} s timeout", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    g = Guest(arch=arch, accel="kvm", name="kvm-probe", image=image,  # type: ignore[arg-type]
              ready_timeout=timeout, wait_ssh=False)
    g.accel = "kvm"
    try:
        g.launch()
        return True, f"KVM guest ready in {time.monotonic() - t0:.1f} s"
    except VmError as exc:
        if exc.kind == "timeout":
            why = "hung (no readiness line)"
        else:
            last = (exc.stderr or "").strip().splitlines()
            why = f"failed ({exc.kind}, QEMU exit {exc.exit_code}: {last[0] if last else exc.message})"
        return False, f"KVM probe boot {why} after {time.monotonic() - t0:.1f} s: using TCG"
    finally:
        g.shutdown(hard=True)


def choose_accel(requested: str, arch: str, image: object, refresh: bool = False) -> AccelChoice:
    """KVM or TCG for real: probes (and caches) when ``requested`` is auto."""
    from .arch import get_arch

    spec = get_arch(arch)
    if requested == "auto" and not spec.kvm_possible():
        return AccelChoice("tcg", f"auto: KVM cannot run {arch} guests on this "
                                  f"{platform.machine()} host")
    return decide(requested, kvm_present=kvm_openable(), key=f"{arch} | {host_key(spec.qemu_binary)}",
                  cache_path=probe_cache_path(), probe=lambda: probe_kvm_boot(arch, image),
                  refresh=refresh)
