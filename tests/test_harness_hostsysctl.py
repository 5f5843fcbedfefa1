"""harness/hostsysctl.py: a host setting widened for a test or a local
scenario goes back when its last holder leaves, never while another still
needs it. On a directory of this test's own standing in for /proc/sys, with
a lock of its own: the real settings are other tests' to hold."""

from __future__ import annotations

import os

import pytest

from harness import hostsysctl

pytestmark = pytest.mark.timeout(30)


def ok_if_wide(text: str) -> bool:
    return text == "wide"


@pytest.fixture
def setting(tmp_path, monkeypatch):
    root = tmp_path / "sys"
    root.mkdir()
    monkeypatch.setattr(hostsysctl, "SETTINGS", str(root) + "/")
    monkeypatch.setattr(hostsysctl, "LOCK", str(tmp_path / "lock"))
    path = root / "knob"
    path.write_text("narrow\n")
    return path


def test_the_last_holder_puts_a_widened_setting_back(setting):
    a = hostsysctl.hold()
    b = hostsysctl.hold()
    hostsysctl.widen(str(setting), ok_if_wide, "wide")      # a local scenario's workload
    assert setting.read_text() == "wide"
    hostsysctl.widen(str(setting), ok_if_wide, "wide")      # again: the first original is kept
    hostsysctl.release(a)
    assert setting.read_text() == "wide"                    # b still needs it
    hostsysctl.release(b)
    assert setting.read_text() == "narrow"
    assert not [n for n in os.listdir(setting.parent.parent) if n.startswith("lock.")]


def test_a_setting_already_as_needed_is_not_touched_or_recorded(setting):
    setting.write_text("wide")
    fd = hostsysctl.hold()
    hostsysctl.widen(str(setting), ok_if_wide, "wide")
    setting.write_text("changed by someone else")
    hostsysctl.release(fd)
    assert setting.read_text() == "changed by someone else"


def test_a_held_block_and_a_widening_holder_share_one_original(setting):
    fd = hostsysctl.hold()
    hostsysctl.widen(str(setting), ok_if_wide, "wide")
    hostsysctl.release(fd)
    assert setting.read_text() == "narrow"
    fd = hostsysctl.hold()
    with_block = []
    hostsysctl.widen(str(setting), ok_if_wide, "wide")
    hostsysctl.release(fd)      # the last holder: back before the block starts
    with hostsysctl.sysctl_held(str(setting), ok_if_wide, "wide"):
        with_block.append(setting.read_text())
    assert with_block == ["wide"] and setting.read_text() == "narrow"


def test_a_record_naming_no_setting_is_left_alone(setting, tmp_path):
    bogus = tmp_path / "elsewhere"
    bogus.write_text("keep")
    with open(hostsysctl.LOCK + ".forged", "w") as f:
        f.write(f"{bogus}\nclobbered")
    hostsysctl.release(hostsysctl.hold())
    assert bogus.read_text() == "keep"
