"""harness/bootcache.py: a booted guest kept between runs (no QEMU here:
the guests are stand-ins that record what was asked of them)."""

import json
import os
from pathlib import Path


from harness import bootcache
from vm import Guest, VmError
from vm.image import ImagePaths


def _image(tmp_path: Path) -> ImagePaths:
    img = ImagePaths(dir=tmp_path / "img", arch="x86_64", recipe_hash="r")
    img.dir.mkdir()
    for p in (img.kernel, img.initrd, img.rootfs):
        p.write_bytes(p.name.encode())
    img.manifest.write_text(json.dumps({"kernel_release": "6.1.0-test"}))
    return img


class FakeGuest:
    fail_load = False
    fail_export = False

    def __init__(self, log, from_snapshot):
        self.log, self.from_snapshot = log, from_snapshot
        self.console_before = ""

    def serial_tail(self, lines):
        return "Linux version 6.1\nCRUCIBLE-READY uptime=3.1\n"

    def __enter__(self):
        if self.from_snapshot and FakeGuest.fail_load:
            raise VmError("loadvm failed", kind="launch")
        self.log.append(("launch", self.from_snapshot))
        return self

    def snapshot(self, tag):
        self.log.append(("snapshot", tag))

    def export_overlay(self, dest):
        Path(dest).write_bytes(b"overlay")
        if FakeGuest.fail_export:
            raise OSError(28, "No space left on device")
        self.log.append(("export",))


def test_first_boot_is_kept_the_next_loads_it_a_bad_one_is_dropped(tmp_path):
    log = []
    root = tmp_path / "booted"
    key = {"k": "k1"}

    def launch():
        return bootcache.launch(lambda fs=None: FakeGuest(log, fs), root, "slot-a", lambda g: key["k"])
    g, how = launch()
    assert how == "booted" and g.from_snapshot is None
    assert log == [("launch", None), ("snapshot", bootcache.TAG), ("export",)]
    assert sorted(p.name for p in root.iterdir()) == ["slot-a-k1.console", "slot-a-k1.qcow2"]
    log.clear()
    g, how = launch()
    assert how == "loaded" and g.from_snapshot == (str(root / "slot-a-k1.qcow2"), bootcache.TAG)
    assert "slot-a-k1.qcow2" in g.console_before and "CRUCIBLE-READY uptime=3.1" in g.console_before
    assert log == [("launch", (str(root / "slot-a-k1.qcow2"), bootcache.TAG))]
    # another key (a new image, QEMU...): booted, kept beside the last one;
    # a third: the oldest goes
    key["k"] = "k0"
    launch()
    os.utime(root / "slot-a-k0.qcow2", ns=(1, 1))     # older than k1
    key["k"] = "k2"
    log.clear()
    g, how = launch()
    assert how == "booted" and sorted(p.name for p in root.iterdir()) == [
        "slot-a-k1.console", "slot-a-k1.qcow2", "slot-a-k2.console", "slot-a-k2.qcow2"]
    assert bootcache.KEEP == 2
    (root / "slot-a-k1.qcow2").unlink()
    # a kept file that does not load: removed, booted, kept anew
    FakeGuest.fail_load = True
    try:
        log.clear()
        g, how = launch()
    finally:
        FakeGuest.fail_load = False
    assert how == "booted" and log[0] == ("launch", None)
    assert (root / "slot-a-k2.qcow2").read_bytes() == b"overlay"
    # ... and when it cannot be kept anew, it is gone all the same (and no half copy stays)
    FakeGuest.fail_load = FakeGuest.fail_export = True
    try:
        g, how = launch()
    finally:
        FakeGuest.fail_load = FakeGuest.fail_export = False
    assert how.startswith("booted: not kept") and "No space" in how
    assert list(root.iterdir()) == []


def test_other_slots_are_left_alone(tmp_path):
    root = tmp_path / "booted"
    bootcache.launch(lambda fs=None: FakeGuest([], fs), root, "img-a", lambda g: "k")
    bootcache.launch(lambda fs=None: FakeGuest([], fs), root, "img-b", lambda g: "k")
    assert sorted(p.name for p in root.iterdir()) == ["img-a-k.console", "img-a-k.qcow2", "img-b-k.console",
                                                      "img-b-k.qcow2"]


def _guest(img, name="gw0a", sock="/tmp/s-1-gw0", mac="52:54:00:77:00:0a", **kw):
    return Guest(arch="x86_64", accel="tcg", name=name, image=img, segment=(f"{sock}a", f"{sock}b", mac),
                 **{"memory_mb": 512, **kw})


def test_the_command_line_key_ignores_per_run_paths_and_sees_the_rest(tmp_path):
    img = _image(tmp_path)
    a = bootcache.placeholder_argv(_guest(img))
    assert bootcache.placeholder_argv(_guest(img, name="gw1a", sock="/tmp/s-99-gw1")) == a
    assert bootcache.placeholder_argv(_guest(img, mac="52:54:00:77:00:0b")) != a      # the b guest
    assert bootcache.placeholder_argv(_guest(img, memory_mb=256)) != a
    assert bootcache.placeholder_argv(_guest(img, smp=2)) != a
    assert bootcache.placeholder_argv(_guest(img, extra_append=["quiet"])) != a


def test_the_key_follows_the_image_qemu_accel_and_argv(tmp_path):
    img = _image(tmp_path)
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_bytes(b"qemu")
    k = bootcache.key(img, str(qemu), "tcg", ["-m", "512"])
    assert bootcache.key(img, str(qemu), "tcg", ["-m", "512"]) == k
    assert bootcache.key(img, str(qemu), "kvm", ["-m", "512"]) != k
    assert bootcache.key(img, str(qemu), "tcg", ["-m", "256"]) != k
    for p in (img.kernel, img.initrd, img.rootfs, qemu):
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        k2 = bootcache.key(img, str(qemu), "tcg", ["-m", "512"])
        assert k2 != k, p
        k = k2
    img.manifest.write_text(json.dumps({"kernel_release": "6.1.0-other"}))
    assert bootcache.key(img, str(qemu), "tcg", ["-m", "512"]) != k


def test_off_switch(monkeypatch):
    monkeypatch.setenv("CRUCIBLE_BOOT_CACHE", "0")
    assert not bootcache.enabled()
    monkeypatch.delenv("CRUCIBLE_BOOT_CACHE")
    assert bootcache.enabled()


def test_a_loaded_guests_serial_tail_starts_with_the_console_before_it(tmp_path):
    g = _guest(_image(tmp_path))
    g.serial_log = tmp_path / "s.log"
    g.serial_log.write_text("after the load\n")
    assert g.serial_tail(10) == "after the load"
    g.console_before = "[kept boot]\nCRUCIBLE-READY"
    assert g.serial_tail(10) == "[kept boot]\nCRUCIBLE-READY\nafter the load"


def test_the_key_follows_qemus_firmware_files(tmp_path):
    img = _image(tmp_path)
    fw = tmp_path / "fw"
    fw.mkdir()
    (fw / "bios-256k.bin").write_bytes(b"bios")
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text(f"#!/bin/sh\n[ \"$1 $2\" = '-L help' ] && echo {fw}\n")
    qemu.chmod(0o755)
    assert bootcache.firmware_ids(str(qemu)) == [bootcache._file_id(fw / "bios-256k.bin")]
    k = bootcache.key(img, str(qemu), "tcg", [])
    (fw / "bios-256k.bin").write_bytes(b"a newer bios")          # a seabios upgrade, QEMU unchanged
    assert bootcache.key(img, str(qemu), "tcg", []) != k
