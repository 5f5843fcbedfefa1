"""``python3 -m vm survey``: ``ckpt survey`` in a booted guest, kept as a
report per arch and guest kernel.

``reports/survey-<arch>-<kernel>.json`` holds the survey's JSON (the
``result`` of ``ckpt survey --json``) with a ``guest`` block naming the
cell; ``.html`` next to it is the page ``ckpt survey --html`` wrote in the
guest. Kept per nightly run, they show the map of what blocks a checkpoint
shrink (or not) over time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from . import recipe as R
from .errors import VmError
from .paths import replace_text

GUEST_HTML = "/tmp/ckpt-survey.html"


def report_paths(out_dir: Path, arch: str, kernel: str, distro: str = R.DEFAULT_DISTRO) -> Tuple[Path, Path]:
    stem = f"survey-{R.axis_name(arch, kernel, distro)}"
    return Path(out_dir) / f"{stem}.json", Path(out_dir) / f"{stem}.html"


def survey_guest(guest: Any, out_dir: Path, arch: str, kernel: str, settle_s: float = 2.0,
                 timeout: float = 900, distro: str = R.DEFAULT_DISTRO) -> Dict[str, Any]:
    """Run ``ckpt survey --json --html`` in the running ``guest`` (anything
    with ``run(cmd, timeout)`` and ``get_bytes(path)``, as vm.guest.Guest)
    after ``settle_s`` seconds for its services to start; write both
    reports under ``out_dir``; return the survey result.

    Raises:
        VmError(kind="command"): the survey failed or printed no JSON.
    """
    if settle_s > 0:
        time.sleep(settle_s)
    res = guest.run(["ckpt", "survey", "--json", "--html", GUEST_HTML], timeout=timeout)
    try:
        doc = json.loads(res.stdout)
        result = doc["result"]
    except (ValueError, KeyError, TypeError):
        raise VmError("ckpt survey printed no survey JSON", kind="command", guest=getattr(guest, "name", None),
                      rc=res.rc, stdout=res.stdout[-4000:], stderr=res.stderr[-4000:]) from None
    if res.rc != 0 or not doc.get("ok"):
        raise VmError("ckpt survey failed in the guest", kind="command", guest=getattr(guest, "name", None),
                      rc=res.rc, stdout=res.stdout[-4000:], stderr=res.stderr[-4000:])
    result["guest"] = {"arch": arch, "distro": distro, "kernel": kernel, "kernel_release": result.get("kernel"),
                       "accel": getattr(guest, "accel", None)}
    jpath, hpath = report_paths(out_dir, arch, kernel, distro)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    replace_text(jpath, json.dumps(result, indent=1, sort_keys=True) + "\n")
    replace_text(hpath, guest.get_bytes(GUEST_HTML).decode(errors="replace"))
    return result


def run_survey(out_dir: Path, arch: str, kernel: str, accel: str = "auto", engine_dir: Optional[Path] = None,
               settle_s: float = 2.0, distro: str = R.DEFAULT_DISTRO) -> Dict[str, Any]:
    """Boot a guest of ``arch``/``distro``/``kernel`` with the engine
    installed and survey it (see :func:`survey_guest`)."""
    from .guest import Guest
    from .image import ensure_image

    img = ensure_image(arch, kernel=kernel, distro=distro)
    with Guest(arch=arch, accel=accel, name="survey", image=img, engine_dir=engine_dir) as g:
        return survey_guest(g, out_dir, arch, kernel, settle_s=settle_s, distro=distro)


def summary_line(result: Dict[str, Any], top: int = 3) -> str:
    s = result.get("summary", {})
    c = s.get("counts", {})
    causes = ", ".join(f"{x['label']} {x['processes']}" for x in s.get("causes", [])[:top])
    return (f"{c.get('restorable', 0)} restorable, {c.get('refused', 0)} refused, "
            f"{c.get('uninspectable', 0)} not inspectable; top causes: {causes or 'none'}")
