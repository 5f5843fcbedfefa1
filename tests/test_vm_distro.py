"""The guest-distro axis (bookworm | trixie) next to the kernel axis: the
choices, the recipes and cache keys (bookworm's must stay what they were
before the axis, so its cached images stay valid), the mirrors, the CLI,
make and the pytest option. No QEMU is started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vm import recipe as R
from vm.errors import VmError

REPO = Path(__file__).resolve().parent.parent

#: The rootfs recipe's keys before the distro axis: bookworm's dict (and so
#: its hash, the cache key of every image built so far) keeps exactly these.
ROOTFS_KEYS = {"rootfs_version", "arch", "deb_arch", "suite", "extra_suites", "packages", "programs", "programs_build",
               "dpkg_excludes", "essential_hook"}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("CRUCIBLE_CACHE", str(tmp_path))
    return tmp_path


def test_distro_choices_each_with_its_own_kernels():
    assert R.DEFAULT_DISTRO == "bookworm" and set(R.DISTROS) == {"bookworm", "trixie"}
    assert R.default_kernel() == R.DEFAULT_KERNEL == "6.1" and R.default_kernel("trixie") == "6.12"
    assert R.KERNELS == R.DISTROS["bookworm"]
    assert R.kernel_suite("6.12", "trixie") == "trixie"
    assert R.kernel_include("linux-image-cloud-amd64", "6.12", "trixie") == "linux-image-cloud-amd64"
    for distro, kernel in (("trixie", "6.1"), ("trixie", "backports"), ("bookworm", "6.12")):
        with pytest.raises(VmError) as e:
            R.kernel_suite(kernel, distro)
        assert e.value.kind == "usage" and distro in str(e.value)
    with pytest.raises(VmError) as e:
        R.default_kernel("sid")
    assert e.value.kind == "usage" and "bookworm, trixie" in str(e.value)


def test_bookworm_recipe_is_unchanged_by_the_axis():
    for args in (("x86_64", "amd64", "linux-image-cloud-amd64", "6.1"),
                 ("aarch64", "arm64", "linux-image-arm64", "backports", True)):
        rec = R.rootfs_recipe(*args)
        assert set(rec) == ROOTFS_KEYS and rec["suite"] == "bookworm"
        assert rec == R.rootfs_recipe(*args + (() if len(args) == 5 else (False,)), distro="bookworm")
    img = R.recipe("x86_64", "linux-image-cloud-amd64", ["virtio_blk"], "0" * 64)
    assert "distro" not in img and img["suite"] == "bookworm"


def test_trixie_recipe_installs_everything_from_trixie():
    rec = R.rootfs_recipe("x86_64", "amd64", "linux-image-cloud-amd64", "6.12", distro="trixie")
    assert rec["suite"] == "trixie" and rec["extra_suites"] == []
    assert "linux-image-cloud-amd64" in rec["packages"] and "criu" in rec["packages"]
    bw = R.rootfs_recipe("x86_64", "amd64", "linux-image-cloud-amd64", "6.1")
    assert R.recipe_hash(rec) != R.recipe_hash(bw)
    a = R.recipe("x86_64", "linux-image-cloud-amd64", [], "0" * 64, kernel="6.12", distro="trixie")
    b = R.recipe("x86_64", "linux-image-cloud-amd64", [], "0" * 64, kernel="6.1")
    assert a["suite"] == "trixie" and R.recipe_hash(a) != R.recipe_hash(b)


def test_cache_names_carry_the_distro_but_bookworm_keeps_its_old_names(cache: Path):
    from vm.image import image_paths
    from vm.rootfs import rootfs_paths

    try:
        bw, tx = image_paths("x86_64", "6.1"), image_paths("x86_64", distro="trixie")
    except VmError as exc:  # no static busybox on this host (the x86_64 recipe hashes it)
        pytest.skip(str(exc))
    assert bw.dir.name == f"x86_64-6.1-{bw.recipe_hash}" and bw.distro == "bookworm"
    assert tx.dir.name == f"x86_64-trixie-6.12-{tx.recipe_hash}"
    assert (tx.distro, tx.kernel_choice) == ("trixie", "6.12") and tx.recipe_hash != bw.recipe_hash
    assert image_paths("aarch64", distro="trixie").dir.name.startswith("aarch64-trixie-6.12-")
    assert rootfs_paths("aarch64", "6.1").tar.name.startswith("aarch64-6.1-")
    assert rootfs_paths("aarch64", "6.12", "trixie").tar.name.startswith("aarch64-trixie-6.12-")
    with pytest.raises(VmError):
        image_paths("x86_64", "backports", "trixie")


def test_pruning_one_distro_leaves_the_other_alone(cache: Path):
    from vm.image import prune_old_images
    from vm.paths import images_dir

    bw = [f"x86_64-6.1-{h}" for h in ("a1", "a2", "a3")]
    tx = [f"x86_64-trixie-6.12-{h}" for h in ("t1", "t2", "t3")]
    for i, n in enumerate(bw + tx):
        (images_dir() / n).mkdir()
        os.utime(images_dir() / n, (1000 + i, 1000 + i))
    prune_old_images("x86_64", "6.12", keep=images_dir() / tx[2], distro="trixie")
    assert sorted(p.name for p in images_dir().iterdir()) == bw + tx[1:]   # the oldest trixie one went
    prune_old_images("x86_64", "6.1", keep=images_dir() / bw[2])
    assert sorted(p.name for p in images_dir().iterdir()) == bw[1:] + tx[1:]


def test_trixie_mirrors_derived_from_a_bookworm_host(tmp_path: Path):
    from vm.image import host_mirrors

    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm bookworm-updates bookworm-backports\n"
        "Components: main\n\nTypes: deb\nURIs: http://sec.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    assert host_mirrors("trixie", str(tmp_path)) == [
        "deb http://m.example/debian trixie main", "deb http://m.example/debian trixie-updates main",
        "deb http://sec.example/debian-security trixie-security main"]   # not bookworm's backports
    # a host that lists trixie itself is taken as it is
    (tmp_path / "sources.list").write_text("deb http://t.example/debian trixie main\n")
    assert host_mirrors("trixie", str(tmp_path)) == ["deb http://t.example/debian trixie main"]
    assert host_mirrors("bookworm", str(tmp_path))[0] == "deb http://m.example/debian bookworm main"


def test_mmdebstrap_argv_for_trixie(monkeypatch):
    import vm.image
    from vm.rootfs import mirror_lines, mmdebstrap_argv, rootfs_recipe_for

    monkeypatch.setattr(vm.image, "host_mirrors",
                        lambda suite=R.SUITE: [f"deb http://m.example/debian {suite} main"])
    lines = mirror_lines([], "trixie")
    assert lines == ["deb http://m.example/debian trixie main"]
    argv = mmdebstrap_argv(rootfs_recipe_for("x86_64", "6.12", "trixie"), Path("/x/r.tar"), lines)
    i = argv.index("trixie")
    assert argv[i + 1] == "/x/r.tar" and argv[i + 2:] == lines and "bookworm" not in " ".join(argv)


def test_guest_distro_checked_before_any_boot(cache: Path):
    from vm import Guest
    from vm.image import ImagePaths

    img = ImagePaths(cache / "images" / "x86_64-trixie-6.12-abc", "x86_64", "abc", "6.12", "trixie")
    g = Guest(image=img)
    assert (g.distro, g.kernel) == ("trixie", "6.12")
    assert (Guest(distro="trixie").kernel, Guest().distro) == ("6.12", "bookworm")
    for kw in ({"image": img, "distro": "bookworm"}, {"distro": "trixie", "kernel": "6.1"}, {"distro": "sid"}):
        with pytest.raises(VmError) as e:
            Guest(**kw)
        assert e.value.kind == "usage"


def _vm(*args: str, env: dict = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vm", *args], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=60)


def test_cli_cache_key_and_usage_errors(cache: Path):
    from vm.rootfs import rootfs_paths

    env = {"CRUCIBLE_CACHE": str(cache)}
    out = _vm("cache-key", "--arch", "aarch64", "--distro", "trixie", env=env)
    assert out.returncode == 0 and out.stdout.strip() == \
        f"aarch64-trixie-6.12-{rootfs_paths('aarch64', '6.12', 'trixie').rootfs_hash}"
    assert _vm("cache-key", "--arch", "aarch64", env=env).stdout.strip() == \
        f"aarch64-6.1-{rootfs_paths('aarch64', '6.1').rootfs_hash}"
    assert _vm("cache-key", "--arch", "aarch64", env={**env, "DISTRO": "trixie"}).stdout.startswith(
        "aarch64-trixie-6.12-")
    bad = _vm("cache-key", "--arch", "aarch64", "--distro", "trixie", "--kernel", "6.1", env=env)
    assert bad.returncode == 2 and "unknown guest kernel '6.1' for trixie" in bad.stderr
    assert _vm("cache-key", "--distro", "sid", env=env).returncode == 2


@pytest.mark.parametrize("extra,kernel,distro,junit", [
    ([], "6.1", "bookworm", "junit-x86_64-6.1-ckpt.xml"),
    (["DISTRO=trixie", "ENGINE=criu"], "6.12", "trixie", "junit-x86_64-trixie-6.12-criu.xml")])
def test_make_passes_the_distro_and_its_kernel(extra, kernel, distro, junit):
    if shutil.which("make") is None:
        pytest.fail("make is required")
    out = subprocess.run(["make", "-n", "vm-test", *extra], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert f"-m vm image --arch x86_64 --kernel {kernel} --distro {distro}" in out
    pytest_part = out.split("pytest", 1)[1]
    assert f"--kernel {kernel} --distro {distro}" in pytest_part and f"reports/{junit}" in pytest_part


def test_pytest_option_and_host_distro(tmp_path: Path):
    from harness.pytest_plugin import host_distro

    (tmp_path / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nVERSION_CODENAME=trixie\n')
    assert host_distro(str(tmp_path / "os-release")) == "trixie"
    assert host_distro(str(tmp_path / "missing")) == ""
    res = subprocess.run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert "--distro" in res.stdout


def test_programs_compile_inside_the_tree_and_their_source_is_in_the_key(monkeypatch, tmp_path):
    import hashlib

    from vm.rootfs import mmdebstrap_argv, rootfs_recipe_for

    rec = rootfs_recipe_for("x86_64", "6.1")
    src = R.program_source("cthreads")
    assert rec["programs"] == {"cthreads": hashlib.sha256(src.read_bytes()).hexdigest()}
    assert "gcc" in rec["packages"] and "libc6-dev" in rec["packages"]
    # the compiler goes again in the same hook: no toolchain in the image
    assert "apt-get purge -y -q --autoremove gcc libc6-dev" in rec["programs_build"]
    assert f"-o {R.PROGRAMS_DIR}/cthreads {R.PROGRAMS_SRC}/cthreads.c" in rec["programs_build"]
    argv = mmdebstrap_argv(rec, Path("/x/r.tar"), ["deb http://m.example/debian bookworm main"])
    hooks = [a for a in argv if a.startswith("--customize-hook=")]
    assert str(src) in hooks[0] and hooks[1].startswith('--customize-hook=chroot "$1" sh -c ')
    assert argv.index(hooks[-1]) < argv.index("bookworm")
    # an edit of the source is a new rootfs
    copy = tmp_path / "cthreads.c"
    copy.write_bytes(src.read_bytes() + b"\n/* edited */\n")
    monkeypatch.setattr(R, "program_source", lambda name: copy)
    assert R.recipe_hash(rootfs_recipe_for("x86_64", "6.1")) != R.recipe_hash(rec)
