"""Real guests on the new axes: aarch64 under TCG, and the backports kernel.

The aarch64 tests need the cached aarch64 image (``make vm-image
ARCH=aarch64``: ~5 min of mmdebstrap through qemu-user, then seconds) and
skip with that reason when it is not there; they never build it. The x86_64
backports test does not skip: it builds its image when missing (~2 min once,
cached after).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vm_support import no_qemu_left_behind  # noqa: F401
from vm import Guest, ensure_image
from vm.image import image_paths

pytestmark = pytest.mark.guest

ENGINE_DIR = Path(__file__).resolve().parent.parent / "engine"


def _missing(why: str) -> None:
    """Skip for want of the aarch64 image or QEMU; where CI built them
    (CRUCIBLE_REQUIRE_AARCH64, make test-aarch64-guest) that is a failure."""
    if os.environ.get("CRUCIBLE_REQUIRE_AARCH64"):
        pytest.fail(f"CRUCIBLE_REQUIRE_AARCH64 is set but: {why}")
    pytest.skip(why)


def cached_aarch64_image(kernel: str):
    """The cached aarch64 image, or a skip naming how to build it."""
    if shutil.which("qemu-system-aarch64") is None:
        _missing("qemu-system-aarch64 not installed (make setup ARCH=aarch64)")
    img = image_paths("aarch64", kernel)
    if not img.exists():
        _missing(f"aarch64 image for kernel {kernel} not cached ({img.dir}); "
                    f"build it with: make vm-image ARCH=aarch64 KERNEL={kernel} (~5-6 min)")
    return img


@pytest.fixture(scope="module")
def a64(tmp_path_factory):
    img = cached_aarch64_image("6.1")
    with Guest(arch="aarch64", accel="auto", name="t-a64", image=img, engine_dir=ENGINE_DIR,
               log_dir=tmp_path_factory.mktemp("guests-a64")) as g:
        yield g


@pytest.mark.aarch64
def test_aarch64_guest_boots_under_tcg_and_is_arm64(a64: Guest):
    assert a64.accel == "tcg" and "cannot run aarch64" in a64.accel_reason
    res = a64.run("uname -m; python3 -c 'import platform; print(platform.machine())'; cat /proc/1/comm",
                  timeout=60, check=True)
    assert res.stdout.split() == ["aarch64", "aarch64", "init"]
    assert a64.argv[0] == "qemu-system-aarch64" and a64.argv[a64.argv.index("-machine") + 1] == "virt"
    assert "max,pauth-impdef=on" in a64.argv
    assert "CRUCIBLE-READY" in a64.serial_tail(lines=200)


@pytest.mark.aarch64
def test_aarch64_engine_installed_and_criu_present(a64: Guest):
    """The engine is copied in at launch and runs on the guest's python3;
    Debian's arm64 criu is there for comparison runs."""
    res = a64.run("ckpt --help", timeout=120)
    assert res.rc == 0 and "dump" in res.stdout, res
    res = a64.run("criu check", timeout=120)
    assert res.rc == 0 and "Looks good" in res.stdout + res.stderr, res


@pytest.mark.aarch64
def test_aarch64_snapshot_revert_drops_a_file_written_after(a64: Guest):
    a64.run("echo before > /root/kept", timeout=60, check=True)
    a64.snapshot("t-golden")
    a64.run("echo after > /root/dropped; rm /root/kept", timeout=60, check=True)
    a64.revert("t-golden")
    res = a64.run("cat /root/kept; ls /root/dropped", timeout=60)
    assert res.stdout == "before\n" and res.rc != 0 and "No such file" in res.stderr


@pytest.mark.aarch64
@pytest.mark.slow
def test_aarch64_backports_kernel_boots(tmp_path: Path):
    img = cached_aarch64_image("backports")
    with Guest(arch="aarch64", name="t-a64-bp", image=img, log_dir=tmp_path) as g:
        assert g.kernel == "backports"
        release = g.run("uname -r", timeout=60, check=True).stdout.strip()
    assert release == img.info()["kernel_release"] and not release.startswith("6.1.")


@pytest.mark.slow
def test_x86_64_backports_kernel_boots_newer_than_6_1(tmp_path: Path):
    """The kernel axis on x86_64: the image for KERNEL=backports is built
    if missing and boots bookworm-backports' kernel."""
    img = ensure_image("x86_64", kernel="backports")
    assert img.kernel_choice == "backports" and img.dir.name.startswith("x86_64-backports-")
    with Guest(arch="x86_64", name="t-x86-bp", image=img, log_dir=tmp_path) as g:
        release = g.run("uname -r", timeout=60, check=True).stdout.strip()
    major, minor = (int(x) for x in release.split(".")[:2])
    assert (major, minor) > (6, 1), release
    assert release == img.info()["kernel_release"] and release.endswith("cloud-amd64")
