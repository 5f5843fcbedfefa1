"""Pure tests of the aarch64 arch, the guest-kernel axis and its cache keys.

No QEMU is started: these check the argv, the recipes and the cache keys
that decide what gets built and booted.
"""

from __future__ import annotations

import json
import platform
import struct
from pathlib import Path

import pytest

from vm import recipe as R
from vm.arch import get_arch
from vm.argv import LaunchSpec, build_argv, kernel_append
from vm.errors import VmError


def spec(**kw):
    base = dict(name="a0", kernel="/img/vmlinuz", initrd="/img/initrd.img", overlay="/t/o.qcow2",
                accel="tcg", ssh_port=40122, qmp_socket="/t/qmp.sock", serial_log="/t/s.log")
    base.update(kw)
    return LaunchSpec(**base)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("CRUCIBLE_CACHE", str(tmp_path))
    return tmp_path


# ------------------------------------------------------------------ argv

def test_aarch64_argv_virt_machine_pauth_impdef_pl011_console():
    argv = build_argv(get_arch("aarch64"), spec(tb_size_mb=96))
    assert argv[0] == "qemu-system-aarch64" and all(isinstance(x, str) for x in argv)
    assert argv[argv.index("-machine") + 1] == "virt"
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=96"
    # plain -cpu max emulates QARMA pointer auth: ~2x slower boot under TCG
    assert argv[argv.index("-cpu") + 1] == "max,pauth-impdef=on"
    assert argv[argv.index("-append") + 1].startswith("console=ttyAMA0 ")
    assert "virtio-blk-pci,drive=root" in argv  # savevm needs a migratable root disk
    assert "hostfwd=tcp:127.0.0.1:40122-:22" in argv[argv.index("-netdev") + 1]
    assert argv[argv.index("-kernel") + 1] == "/img/vmlinuz"
    assert "-bios" not in argv and "-pflash" not in argv  # -kernel boot, no UEFI


def test_aarch64_loadvm_keeps_device_list_identical():
    plain = build_argv(get_arch("aarch64"), spec())
    loaded = build_argv(get_arch("aarch64"), spec(loadvm="golden"))
    i = loaded.index("-loadvm")
    assert loaded[:i] + loaded[i + 2:] == plain


def test_aarch64_kvm_is_a_usage_error_and_unknown_accel_too():
    a = get_arch("aarch64")
    with pytest.raises(VmError) as e:
        build_argv(a, spec(accel="kvm"))
    assert e.value.kind == "usage" and "KVM" in str(e.value)
    with pytest.raises(VmError):
        build_argv(a, spec(accel="hvf"))
    assert kernel_append(a, []).split()[0] == "console=ttyAMA0"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="cross-arch KVM check is for x86_64 hosts")
def test_auto_accel_for_aarch64_is_tcg_without_a_probe_boot(monkeypatch):
    import vm.accel as accel

    def no_probe(*a, **kw):
        raise AssertionError("a probe boot was attempted for a cross-arch guest")

    monkeypatch.setattr(accel, "probe_kvm_boot", no_probe)
    monkeypatch.setattr(accel, "kvm_openable", lambda dev="/dev/kvm": True)  # even with /dev/kvm
    choice = accel.choose_accel("auto", "aarch64", image=None)
    assert choice.accel == "tcg" and "cannot run aarch64" in choice.reason
    assert accel.choose_accel("tcg", "aarch64", image=None).accel == "tcg"
    assert get_arch("x86_64").kvm_possible() and not get_arch("aarch64").kvm_possible()


def test_aarch64_initramfs_modules_resolve_with_deps_from_an_arm64_modules_dep():
    """Everything is a module on arm64: ext4 and its checksum provider too."""
    from vm.initramfs import module_name, parse_modules_dep, resolve_modules

    mods = get_arch("aarch64").initramfs_modules
    assert {"virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4"} <= set(mods)
    # crc32c_generic must be loaded before ext4 mounts (it registers "crc32c")
    assert mods.index("crc32c_generic") < mods.index("ext4")
    dep = parse_modules_dep(
        "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz\n"
        "kernel/lib/crc16.ko.xz:\nkernel/fs/mbcache.ko.xz:\nkernel/fs/jbd2/jbd2.ko.xz:\n"
        "kernel/crypto/crc32c_generic.ko.xz:\n"
        "kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz\n"
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:\n"
        "kernel/drivers/block/virtio_blk.ko.xz:\n"
        "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz\n"
        "kernel/drivers/net/net_failover.ko.xz:\n")
    names = [module_name(p) for p in resolve_modules(dep, mods)]
    for before, after in (("crc16", "ext4"), ("jbd2", "ext4"), ("mbcache", "ext4"),
                          ("virtio_pci_modern_dev", "virtio_pci"), ("net_failover", "virtio_net")):
        assert names.index(before) < names.index(after)
    assert len(names) == len(set(names))


# ------------------------------------------------------------ kernel axis

def test_kernel_choices_and_their_suites():
    assert R.DEFAULT_KERNEL == "6.1" and set(R.KERNELS) >= {"6.1", "backports"}
    assert R.kernel_include("linux-image-arm64", "6.1") == "linux-image-arm64"
    assert R.kernel_include("linux-image-arm64", "backports") == "linux-image-arm64/bookworm-backports"
    with pytest.raises(VmError) as e:
        R.kernel_suite("5.10")
    assert e.value.kind == "usage" and "backports" in str(e.value)


def test_rootfs_recipe_backports_adds_the_suite_and_selects_the_kernel_from_it():
    r61 = R.rootfs_recipe("aarch64", "arm64", "linux-image-arm64", "6.1", foreign=True)
    rbp = R.rootfs_recipe("aarch64", "arm64", "linux-image-arm64", "backports", foreign=True)
    assert r61["extra_suites"] == [] and rbp["extra_suites"] == ["bookworm-backports"]
    assert "linux-image-arm64" in r61["packages"]
    assert "linux-image-arm64/bookworm-backports" in rbp["packages"]
    assert "busybox-static" in r61["packages"]  # the guest's own-arch init
    x86 = R.rootfs_recipe("x86_64", "amd64", "linux-image-cloud-amd64", "6.1")
    assert "busybox-static" not in x86["packages"]  # native: the host's static busybox
    assert len({R.recipe_hash(r) for r in (r61, rbp, x86)}) == 3
    # foreign installs must not run mkinitramfs under qemu-user (minutes)
    assert "update-initramfs" in r61["essential_hook"]


def test_image_cache_key_includes_arch_and_kernel(cache: Path):
    from vm.image import image_paths

    keys = {}
    for arch in ("x86_64", "aarch64"):
        for kernel in ("6.1", "backports"):
            try:
                p = image_paths(arch, kernel)
            except VmError as exc:  # no static busybox on this host (x86_64 recipe hashes it)
                pytest.skip(str(exc))
            assert p.dir.name == f"{arch}-{kernel}-{p.recipe_hash}" and p.kernel_choice == kernel
            assert p.dir.parent == cache / "images"
            keys[(arch, kernel)] = p.recipe_hash
    assert len(set(keys.values())) == 4
    assert image_paths("aarch64").kernel_choice == "6.1"  # the default
    with pytest.raises(VmError):
        image_paths("aarch64", "bogus")


def test_rootfs_key_survives_init_changes_but_image_key_does_not(cache: Path, monkeypatch):
    """Changing the tiny init rebuilds the image (seconds) but not the
    mmdebstrap tree (~5 min for arm64 through qemu-user)."""
    from vm.image import image_paths
    from vm.rootfs import rootfs_paths

    before_img = image_paths("aarch64", "backports").recipe_hash
    before_root = rootfs_paths("aarch64", "backports").rootfs_hash
    monkeypatch.setattr(R, "RC", R.RC + "\n# changed\n")
    assert image_paths("aarch64", "backports").recipe_hash != before_img
    assert rootfs_paths("aarch64", "backports").rootfs_hash == before_root
    monkeypatch.setattr(R, "PACKAGES", R.PACKAGES + ["vim"])
    assert rootfs_paths("aarch64", "backports").rootfs_hash != before_root
    assert rootfs_paths("aarch64", "backports").tar.name.startswith("aarch64-backports-")


def test_mmdebstrap_argv_and_mirrors_for_backports(monkeypatch):
    import vm.image
    from vm.rootfs import mirror_lines, mmdebstrap_argv, rootfs_recipe_for

    monkeypatch.setattr(vm.image, "host_mirrors",
                        lambda suite=R.SUITE: ["deb http://m.example/debian bookworm main",
                                               "deb http://s.example/debian-security bookworm-security main"])
    lines = mirror_lines(["bookworm-backports"])
    assert lines[-1] == "deb http://m.example/debian bookworm-backports main"  # the main mirror, not security
    rec = rootfs_recipe_for("aarch64", "backports")
    argv = mmdebstrap_argv(rec, Path("/x/rootfs.tar"), lines)
    assert argv[0] == "mmdebstrap" and "--architectures=arm64" in argv
    inc = next(a for a in argv if a.startswith("--include="))
    assert "linux-image-arm64/bookworm-backports" in inc.split("=", 1)[1].split(",")
    assert any(a.startswith("--essential-hook=") for a in argv)
    i = argv.index("bookworm")
    assert argv[i + 1] == "/x/rootfs.tar" and argv[i + 2:] == lines


def test_guest_kernel_parameter_checks_before_any_boot(cache: Path):
    from vm import Guest
    from vm.image import ImagePaths

    img = ImagePaths(cache / "images" / "aarch64-6.1-abc", "aarch64", "abc", "6.1")
    assert Guest(arch="aarch64", image=img).kernel == "6.1"
    assert Guest(arch="aarch64", kernel="backports").kernel == "backports"
    assert Guest(arch="aarch64").kernel == "6.1"
    with pytest.raises(VmError) as e:
        Guest(arch="aarch64", image=img, kernel="backports")
    assert e.value.kind == "usage"
    with pytest.raises(VmError) as e:
        Guest(arch="aarch64", kernel="4.19")
    assert e.value.kind == "usage"


# ------------------------------------------------ foreign-arch build bits

def test_binfmt_registration_is_read_from_the_entry(tmp_path: Path):
    from vm.rootfs import binfmt_registered, is_foreign

    (tmp_path / "qemu-aarch64").write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n")
    (tmp_path / "qemu-riscv64").write_text("disabled\n")
    assert binfmt_registered("aarch64", tmp_path)
    assert not binfmt_registered("riscv64", tmp_path)
    assert not binfmt_registered("mips", tmp_path)
    assert is_foreign(get_arch("aarch64"), "x86_64") and not is_foreign(get_arch("aarch64"), "aarch64")


def _elf(path: Path, interp: bool) -> None:
    """A minimal 64-bit ELF header + one program header (PT_INTERP or PT_LOAD)."""
    ehdr = bytearray(64)
    ehdr[:4] = b"\x7fELF"
    ehdr[4] = 2
    struct.pack_into("<Q", ehdr, 0x20, 64)           # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)       # e_phentsize, e_phnum
    phdr = bytearray(56)
    struct.pack_into("<I", phdr, 0, 3 if interp else 1)
    path.write_bytes(bytes(ehdr + phdr))


def test_guest_busybox_takes_the_static_one_from_the_tree(tmp_path: Path):
    from vm.image import guest_busybox

    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    with pytest.raises(VmError) as e:
        guest_busybox(tree)
    assert e.value.kind == "image" and "busybox-static" in str(e.value)
    _elf(tree / "usr/bin/busybox", interp=True)  # dynamic: unusable as init
    with pytest.raises(VmError):
        guest_busybox(tree)
    _elf(tree / "usr/bin/busybox", interp=False)
    assert guest_busybox(tree) == tree / "usr/bin/busybox"


# ------------------------------------------------------------------ bench

def test_bench_results_per_arch_keep_other_arches_and_other_keys(tmp_path: Path):
    from vm.bench import bench_key, merge_vm_entry

    out = tmp_path / "results.json"
    legacy = {"accel": "tcg", "boot_to_first_command_cold_s": 2.9}
    out.write_text(json.dumps({"engine": {"x": 1}, "scenarios": {"y": 2}, "vm": legacy}))
    merge_vm_entry(out, bench_key("aarch64"), {"accel": "tcg", "boot_to_first_command_cold_s": 4.9})
    data = json.loads(out.read_text())
    assert data["engine"] == {"x": 1} and data["scenarios"] == {"y": 2}
    assert data["vm"]["x86_64"] == legacy  # the flat pre-arch entry, moved, not dropped
    assert data["vm"]["aarch64"]["boot_to_first_command_cold_s"] == 4.9
    merge_vm_entry(out, bench_key("x86_64", "backports"), {"accel": "tcg"})
    merge_vm_entry(out, bench_key("x86_64"), {"accel": "tcg", "boot_to_first_command_cold_s": 3.0})
    vm = json.loads(out.read_text())["vm"]
    assert set(vm) == {"x86_64", "aarch64", "x86_64+backports"}
    assert vm["x86_64"]["boot_to_first_command_cold_s"] == 3.0 and "aarch64" in vm


def test_x86_64_tcg_hides_cx16_only_from_kernels_that_double_fault_without():
    from vm.arch import release_at_least

    x86 = get_arch("x86_64")
    cpu = lambda rel: (lambda a: a[a.index("-cpu") + 1])(build_argv(x86, spec(kernel_release=rel)))  # noqa: E731
    assert cpu("6.1.0-56-cloud-amd64") == "max"          # bookworm: the full CPU, as before
    assert cpu("") == "max"                              # unknown release: no quirk
    assert cpu("6.12.95+deb12-cloud-amd64") == "max,-cx16"  # backports (SLUB cmpxchg128 path)
    kvm = build_argv(x86, spec(accel="kvm", kernel_release="6.12.95+deb12-cloud-amd64"))
    assert kvm[kvm.index("-cpu") + 1] == "host"           # a TCG quirk only
    a64 = build_argv(get_arch("aarch64"), spec(kernel_release="6.12.95+deb12-arm64"))
    assert a64[a64.index("-cpu") + 1] == "max,pauth-impdef=on"
    assert release_at_least("6.5.0", (6, 5)) and not release_at_least("6.4.16", (6, 5))
    assert not release_at_least("garbage", (6, 5))
