"""Pure tests of the guest package: arch table, QEMU argv, recipe, initramfs, errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vm import recipe as R
from vm.arch import ARCHES, get_arch
from vm.argv import LaunchSpec, build_argv, kernel_append
from vm.errors import HostToolsMissing, VmError
from vm.image import host_mirrors, is_static_elf
from vm.initramfs import CpioWriter, module_name, parse_modules_dep, resolve_modules


def spec(**kw):
    base = dict(name="w0", kernel="/img/vmlinuz", initrd="/img/initrd.img", overlay="/t/o.qcow2",
                accel="tcg", ssh_port=40022, qmp_socket="/t/qmp.sock", serial_log="/t/s.log")
    base.update(kw)
    return LaunchSpec(**base)


def test_arch_table_both_arches_supported_unwired_refused_unknown_rejected(monkeypatch):
    a = get_arch("x86_64")
    assert a.qemu_binary == "qemu-system-x86_64" and a.console == "ttyS0"
    assert "virtio_blk" in a.initramfs_modules
    b = get_arch("aarch64")
    assert b.qemu_binary == "qemu-system-aarch64" and b.console == "ttyAMA0" and b.deb_arch == "arm64"
    import vm.arch
    monkeypatch.setattr(vm.arch, "SUPPORTED", ("x86_64",))  # a known arch not wired is refused
    with pytest.raises(VmError) as e:
        get_arch("aarch64")
    assert e.value.kind == "unsupported" and "not supported yet" in str(e.value)
    with pytest.raises(VmError) as e:
        get_arch("sparc")
    assert e.value.kind == "usage"


def test_argv_is_list_of_str_with_boot_disk_net_qmp_serial():
    argv = build_argv(get_arch("x86_64"), spec())
    assert all(isinstance(x, str) for x in argv)
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-kernel") + 1] == "/img/vmlinuz"
    assert argv[argv.index("-initrd") + 1] == "/img/initrd.img"
    assert argv[argv.index("-m") + 1] == "512"
    assert "virtio-blk-pci,drive=root" in argv  # not NVMe: savevm needs it
    net = argv[argv.index("-netdev") + 1]
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in net  # only on loopback
    assert argv[argv.index("-qmp") + 1] == "unix:/t/qmp.sock,server=on,wait=off"
    assert "file,id=serial0,path=/t/s.log" in argv
    assert "-no-reboot" in argv and "-loadvm" not in argv
    assert argv[argv.index("-append") + 1].startswith("console=ttyS0 ")


def test_accel_pieces_tcg_caps_tb_size_kvm_uses_host_cpu():
    tcg = build_argv(get_arch("x86_64"), spec(accel="tcg", tb_size_mb=64))
    assert tcg[tcg.index("-accel") + 1] == "tcg,tb-size=64"
    kvm = build_argv(get_arch("x86_64"), spec(accel="kvm"))
    assert kvm[kvm.index("-accel") + 1] == "kvm"
    assert kvm[kvm.index("-cpu") + 1] == "host"
    with pytest.raises(VmError):
        build_argv(get_arch("x86_64"), spec(accel="hvf"))


def test_loadvm_keeps_device_list_identical():
    plain = build_argv(get_arch("x86_64"), spec())
    loaded = build_argv(get_arch("x86_64"), spec(loadvm="golden"))
    i = loaded.index("-loadvm")
    assert loaded[i + 1] == "golden"
    assert loaded[:i] + loaded[i + 2:] == plain


def test_kernel_append_extra_params_and_memory():
    a = kernel_append(get_arch("x86_64"), ["cinit=/bin/false"])
    assert a.split()[0] == "console=ttyS0" and a.split()[-1] == "cinit=/bin/false"
    argv = build_argv(get_arch("x86_64"), spec(memory_mb=1024, smp=2))
    assert argv[argv.index("-m") + 1] == "1024" and argv[argv.index("-smp") + 1] == "2"


def test_recipe_hash_changes_with_any_recipe_input():
    base = R.recipe("x86_64", "linux-image-cloud-amd64", ["virtio_blk"], "ab" * 32)
    h = R.recipe_hash(base)
    assert h == R.recipe_hash(dict(base))
    assert R.recipe_hash(dict(base, rc=base["rc"] + "\n# x")) != h
    assert R.recipe_hash(dict(base, packages=base["packages"] + ["vim"])) != h
    assert R.recipe_hash(dict(base, busybox_sha256="cd" * 32)) != h
    assert "mount" in base["packages"]  # --variant=apt leaves it out


def test_init_scripts_reap_and_announce():
    assert "READY" in R.RC and R.READY_MARKER in R.RC
    assert R.INITTAB.startswith("::sysinit:/usr/lib/crucible/rc")
    assert "@MODULES@" in R.INITRAMFS_INIT and "switch_root" in R.INITRAMFS_INIT


def test_modules_dep_resolution_puts_dependencies_first():
    dep = parse_modules_dep(
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n"
        "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/net/core/failover.ko:\n"
        "kernel/drivers/block/virtio_blk.ko.xz:\n")
    order = resolve_modules(dep, ["virtio_net", "virtio_blk"])
    names = [module_name(p) for p in order]
    assert names == ["failover", "net_failover", "virtio_net", "virtio_blk"]
    with pytest.raises(VmError):
        resolve_modules(dep, ["virtio_pci"])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool to cross-check")
def test_cpio_newc_archive_is_readable_by_cpio(tmp_path: Path):
    w = CpioWriter()
    w.dir("bin")
    w.file("bin/hello", b"hello world\n", 0o755)
    w.symlink("bin/sh", "hello")
    w.chardev("dev/console", 5, 1)
    archive = w.finish()
    listing = subprocess.run(["cpio", "-t", "-v"], input=archive, capture_output=True, check=True).stdout.decode()
    assert "bin/hello" in listing and "bin/sh -> hello" in listing and "dev/console" in listing
    subprocess.run(["cpio", "-i", "-d", "--quiet", "bin/hello"], input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "bin/hello").read_bytes() == b"hello world\n"


def test_host_mirrors_reads_both_source_formats(tmp_path: Path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://m.example/debian bookworm main contrib\n"
                                           "deb http://other.example/x stable main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb-src\nURIs: http://src.example\nSuites: bookworm\n")
    lines = host_mirrors("bookworm", str(tmp_path))
    assert lines == ["deb http://m.example/debian bookworm main",
                     "deb http://sec.example/debian-security bookworm-security main"]
    (tmp_path / "sources.list").write_text("")
    assert host_mirrors("bookworm", str(tmp_path))[0] == "deb http://deb.debian.org/debian bookworm main"


def test_static_elf_detection():
    assert not is_static_elf("/nonexistent")
    assert not is_static_elf(__file__)
    if Path("/bin/busybox").exists() and "statically linked" in subprocess.run(
            ["file", "-L", "/bin/busybox"], capture_output=True, text=True).stdout:
        assert is_static_elf("/bin/busybox")
    assert not is_static_elf("/usr/bin/env")  # dynamic on Debian


def test_vm_error_message_carries_its_fields():
    e = VmError("QEMU exited during launch", kind="launch", guest="w0", exit_code=1,
                command=["qemu", "-m", "1 G"], stderr="boom", serial_tail="last line")
    s = str(e)
    assert s.startswith("guest w0: QEMU exited during launch")
    assert "QEMU exit code: 1" in s and "qemu -m '1 G'" in s and "boom" in s and "last line" in s
    m = HostToolsMissing([("mmdebstrap", "mmdebstrap"), ("mke2fs", "e2fsprogs")])
    assert "make setup" in str(m) and "e2fsprogs" in str(m) and m.kind == "host-tools"


def test_missing_host_tools_named_in_one_error_exit_2(tmp_path: Path):
    import os
    import sys
    env = dict(os.environ, PATH=str(tmp_path), CRUCIBLE_CACHE=str(tmp_path / "cache"))
    repo = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-m", "vm", "image", "--arch", "x86_64"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "mmdebstrap" in res.stderr and "mke2fs" in res.stderr and "make setup" in res.stderr
    assert res.stderr.count("error") == 1
    assert not any((tmp_path / "cache" / "images").glob("x86_64-*"))


def test_show_command_prints_argv_without_launching(tmp_path: Path):
    import os
    import shlex
    import sys
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, CRUCIBLE_CACHE=str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "vm", "show-command", "--arch", "x86_64", "--accel", "tcg"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    argv = shlex.split(res.stdout)
    assert argv[0] == "qemu-system-x86_64" and "tcg,tb-size=128" in argv
    res = subprocess.run([sys.executable, "-m", "vm", "show-command", "--arch", "aarch64", "--kernel", "backports"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    argv = shlex.split(res.stdout)
    assert argv[0] == "qemu-system-aarch64" and argv[argv.index("-cpu") + 1] == "max,pauth-impdef=on"
    assert "aarch64-backports-" in argv[argv.index("-kernel") + 1]
    res = subprocess.run([sys.executable, "-m", "vm", "show-command", "--arch", "aarch64", "--kernel", "5.10"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown guest kernel '5.10'" in res.stderr


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch):
    """A build that dies mid-way removes its temp dir; no image dir appears."""
    import vm.image as image

    monkeypatch.setenv("CRUCIBLE_CACHE", str(tmp_path))
    if image.host_busybox() is None:
        pytest.skip("needs the host's static busybox for the recipe hash")
    import vm.buildstep
    monkeypatch.setattr(image, "check_host_tools", lambda arch, build=True: None)
    steps = []

    def failing_run(argv, log, say, stage, env=None):
        steps.append(stage)
        (log.parent / "tree").mkdir()
        (log.parent / "tree" / "half-written").write_text("x")
        log.write_text("E: simulated failure\n")
        raise VmError(f"image build step {stage} failed", kind="image")

    monkeypatch.setattr(vm.buildstep, "run_step", failing_run)
    with pytest.raises(VmError) as e:
        image.ensure_image("x86_64", progress=lambda msg: None)
    assert e.value.kind == "image" and steps == ["mmdebstrap"]
    images = tmp_path / "images"
    assert [p.name for p in images.iterdir() if not p.name.startswith(".lock-")] == []
    assert not image.image_paths("x86_64").exists()
    # the rootfs stage leaves only its failure log, no tarball that looks done
    left = sorted(p.name for p in (tmp_path / "rootfs").iterdir() if not p.name.startswith(".lock-"))
    assert len(left) == 1 and left[0].endswith(".failed.log"), left
    assert "simulated failure" in (tmp_path / "rootfs" / left[0]).read_text()


def test_segment_nic_is_a_dgram_netdev_between_two_unix_sockets():
    plain = build_argv(get_arch("x86_64"), spec())
    seg = build_argv(get_arch("x86_64"), spec(segment=("/t/seg-a", "/t/seg-b", "52:54:00:77:00:0a")))
    nets = [seg[i + 1] for i, x in enumerate(seg) if x == "-netdev"]
    assert nets[1] == ("dgram,id=seg0,local.type=unix,local.path=/t/seg-a,"
                       "remote.type=unix,remote.path=/t/seg-b")
    assert "virtio-net-pci,netdev=seg0,romfile=,mac=52:54:00:77:00:0a" in seg
    assert "seg0" not in " ".join(plain)
    # the device list stays the same with -loadvm (snapshots load into it)
    loaded = build_argv(get_arch("x86_64"), spec(segment=("/t/seg-a", "/t/seg-b", "52:54:00:77:00:0a"),
                                                 loadvm="golden"))
    i = loaded.index("-loadvm")
    assert loaded[:i] + loaded[i + 2:] == seg


def test_serial_tail_keeps_a_panic_reason_a_long_call_trace_pushed_out(tmp_path):
    """The trace after a kernel panic varies in length from boot to boot:
    the reason line comes first whenever it fell out of the tail."""
    from vm.guest import Guest
    g = Guest.__new__(Guest)
    g.serial_log = tmp_path / "serial.log"
    reason = "[    2.3] Kernel panic - not syncing: Requested init /no/such/init failed (error -2)."
    trace = [f"[    2.4] trace line {i}" for i in range(60)]
    g.serial_log.write_text("\n".join(["boot line"] * 5 + [reason] + trace) + "\n")
    tail = g.serial_tail(40).splitlines()
    assert tail[0] == reason and tail[1] == "[...]" and tail[2:] == trace[-40:]
    g.serial_log.write_text("\n".join(["boot line"] * 5 + [reason] + trace[:10]) + "\n")
    assert g.serial_tail(40).splitlines() == ["boot line"] * 5 + [reason] + trace[:10]   # in the tail: once
