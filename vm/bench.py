"""``python3 -m vm bench``: boot, reset and command-latency timings.

Results are merged into a JSON file under the key ``"vm"``, one entry per
arch (and guest kernel): ``{"vm": {"x86_64": {...}, "aarch64": {...},
"x86_64+backports": {...}}}``. Other top-level keys, owned by other
benchmarks, and the other arches' entries are kept as they are.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .guest import Guest
from .image import ensure_image
from .paths import read_json_object, replace_text
from .recipe import DEFAULT_DISTRO, DEFAULT_KERNEL, DEFAULT_KERNELS

#: name -> (target seconds, description)
TARGETS = {
    "boot_to_ready_cold_s": (None, "QEMU start -> readiness line (cold boot)"),
    "boot_to_first_command_cold_s": (4.0, "QEMU start -> first SSH command done (cold boot)"),
    "golden_to_first_command_s": (2.0, "new guest from golden snapshot (-loadvm) -> first command"),
    "snapshot_s": (None, "savevm golden"),
    "reset_s": (1.2, "revert: loadvm + SSH reconnect + first command"),
    "command_latency_s": (0.15, "one command on the open SSH connection (median)"),
    "engine_install_s": (None, "engine tar stream over SSH"),
}


def _median(xs: List[float]) -> float:
    return round(statistics.median(xs), 3)


def merge_results(path: Path, key: str, value: Dict[str, Any]) -> None:
    """Replace ``key`` in the JSON object at ``path`` (created if missing), atomically."""
    data = read_json_object(path)
    data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def bench_key(arch: str, kernel: str = DEFAULT_KERNEL, distro: str = DEFAULT_DISTRO) -> str:
    """The entry under "vm" for ``arch``/``distro``/``kernel``: the arch
    alone for bookworm's default kernel, ``arch+kernel`` for another
    bookworm kernel, ``arch+distro`` for another distro's own kernel."""
    if distro != DEFAULT_DISTRO:
        return f"{arch}+{distro}" if kernel == DEFAULT_KERNELS[distro] else f"{arch}+{distro}+{kernel}"
    return arch if kernel == DEFAULT_KERNEL else f"{arch}+{kernel}"


def merge_vm_entry(path: Path, entry: str, value: Dict[str, Any]) -> None:
    """Set ``data["vm"][entry] = value`` in the JSON file at ``path``,
    keeping every other key and every other entry.

    A flat "vm" object from before the per-arch layout (it has an "accel"
    field) is moved under its own arch (its ``arch`` field, else x86_64, the
    only arch measured then) instead of being dropped.
    """
    try:
        data = json.loads(path.read_text())
        vm = data.get("vm") if isinstance(data, dict) else None
    except (OSError, ValueError):
        vm = None
    if not isinstance(vm, dict):
        vm = {}
    if "accel" in vm:  # legacy flat layout
        vm = {str(vm.get("arch", "x86_64")): vm}
    vm[entry] = value
    merge_results(path, "vm", vm)


def _rss_mb(pid: Optional[int]) -> Optional[float]:
    try:
        import psutil
        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except Exception:  # noqa: BLE001 - psutil missing or the process gone
        return None


def run_bench(out: Path, arch: str = "x86_64", accel: str = "auto", runs: int = 3,
              engine_dir: Optional[Path] = None, latency_n: int = 20,
              kernel: str = DEFAULT_KERNEL, distro: str = DEFAULT_DISTRO) -> Dict[str, Any]:
    """Measure, merge into ``out`` under "vm"/<arch>, print a table; returns the dict.

    Raises:
        VmError: any guest failure (nothing is written then).
    """
    img = ensure_image(arch, kernel=kernel, distro=distro)
    cold_ready: List[float] = []
    cold_first: List[float] = []
    golden_first: List[float] = []
    resets: List[float] = []
    lat: List[float] = []
    res: Dict[str, Any] = {}
    used_accel = accel
    runs = max(1, runs)
    with tempfile.TemporaryDirectory(prefix="crucible-bench-") as tmp:
        for i in range(runs):
            with Guest(arch=arch, accel=accel, name=f"bench-cold{i}", image=img) as g:
                cold_ready.append(g.timings["ready"])
                cold_first.append(g.timings["first_command"])
                used_accel = g.accel
        golden = Path(tmp) / "golden.qcow2"
        with Guest(arch=arch, accel=accel, name="bench-main", image=img, engine_dir=engine_dir) as g:
            if "engine_installed" in g.timings:
                res["engine_install_s"] = round(g.timings["engine_installed"] - g.timings["first_command"], 3)
            for _ in range(latency_n):
                lat.append(g.run("true", timeout=30, check=True).duration)
            res["snapshot_s"] = round(g.snapshot("golden"), 3)
            for _ in range(max(5, runs)):
                g.run("touch /root/dirty", timeout=30, check=True)
                resets.append(g.revert("golden"))
            res["qemu_rss_mb"] = _rss_mb(g._proc.pid if g._proc else None)
            g.export_overlay(golden)
            res["golden_overlay_mb"] = round(golden.stat().st_blocks * 512 / 2**20, 1)
        for i in range(runs):
            with Guest(arch=arch, accel=accel, name=f"bench-golden{i}", image=img,
                       from_snapshot=(golden, "golden")) as g:
                golden_first.append(g.timings["first_command"])
    info = img.info()
    res.update({
        "arch": arch,
        "kernel": kernel,
        "distro": distro,
        "accel": used_accel,
        "runs": runs,
        "boot_to_ready_cold_s": _median(cold_ready),
        "boot_to_first_command_cold_s": _median(cold_first),
        "golden_to_first_command_s": _median(golden_first),
        "reset_s": _median(resets),
        "command_latency_s": _median(lat),
        "command_latency_p90_s": round(sorted(lat)[int(0.9 * (len(lat) - 1))], 3),
        "samples": {"cold_first_command": [round(x, 3) for x in cold_first],
                    "golden_first_command": [round(x, 3) for x in golden_first],
                    "reset": [round(x, 3) for x in resets]},
        "image": {"recipe_hash": img.recipe_hash, "kernel_release": info["kernel_release"],
                  "rootfs_tar_mb": info.get("rootfs_tar_mb"),
                  "rootfs_mb": info["rootfs_mb"], "rootfs_allocated_mb": info["rootfs_allocated_mb"],
                  "initrd_kb": info["initrd_kb"], "build_seconds": info.get("build_seconds")},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    entry = bench_key(arch, kernel, distro)
    merge_vm_entry(out, entry, res)
    print_table(res)
    print(f"(merged into {out} under \"vm\" / \"{entry}\")")
    return res


def print_table(res: Dict[str, Any]) -> None:
    print(f"{'metric':34} {'value':>9} {'target':>8}  ")
    for key, (target, desc) in TARGETS.items():
        if key not in res:
            continue
        val = res[key]
        verdict = "" if target is None else ("ok" if val <= target else "MISSED")
        tgt = "" if target is None else f"<= {target:g}"
        print(f"{key:34} {val:9.3f} {tgt:>8}  {verdict:6} {desc}")
    print(f"accel {res['accel']}; QEMU RSS {res.get('qemu_rss_mb')} MiB; image rootfs "
          f"{res['image']['rootfs_mb']} MiB ({res['image']['rootfs_allocated_mb']} MiB allocated), "
          f"initrd {res['image']['initrd_kb']} KiB")
