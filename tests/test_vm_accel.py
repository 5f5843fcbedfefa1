"""The accelerator choice: decision logic with injected probes, plus one real probe."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vm.accel import choose_accel, decide, load_cached, probe_cache_path
from vm.errors import VmError


@pytest.fixture(scope="session")
def vm_image():
    """The shared guest image (built once, then reused from the cache)."""
    from vm import ensure_image
    return ensure_image("x86_64")


class FakeProbe:
    def __init__(self, ok: bool):
        self.ok = ok
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.ok, f"fake probe {'worked' if self.ok else 'hung'}"


def test_explicit_tcg_never_probes(tmp_path: Path):
    p = FakeProbe(True)
    c = decide("tcg", kvm_present=True, key="h", cache_path=tmp_path / "c.json", probe=p)
    assert c.accel == "tcg" and p.calls == 0


def test_explicit_kvm_needs_dev_kvm(tmp_path: Path):
    p = FakeProbe(False)
    assert decide("kvm", kvm_present=True, key="h", cache_path=tmp_path / "c", probe=p).accel == "kvm"
    with pytest.raises(VmError) as e:
        decide("kvm", kvm_present=False, key="h", cache_path=tmp_path / "c", probe=p)
    assert e.value.kind == "usage"
    with pytest.raises(VmError):
        decide("hvf", kvm_present=True, key="h", cache_path=tmp_path / "c", probe=p)
    assert p.calls == 0


def test_auto_without_kvm_is_tcg_without_probe(tmp_path: Path):
    p = FakeProbe(True)
    c = decide("auto", kvm_present=False, key="h", cache_path=tmp_path / "c.json", probe=p)
    assert c.accel == "tcg" and "/dev/kvm" in c.reason and p.calls == 0


def test_auto_hanging_kvm_falls_back_to_tcg_and_caches(tmp_path: Path):
    cache = tmp_path / "c.json"
    p = FakeProbe(False)
    first = decide("auto", kvm_present=True, key="host-a", cache_path=cache, probe=p)
    assert first.accel == "tcg" and not first.cached and p.calls == 1
    second = decide("auto", kvm_present=True, key="host-a", cache_path=cache, probe=p)
    assert second.accel == "tcg" and second.cached and p.calls == 1  # no second probe
    assert load_cached(cache, "host-a")["accel"] == "tcg"


def test_auto_working_kvm_is_kvm(tmp_path: Path):
    p = FakeProbe(True)
    assert decide("auto", kvm_present=True, key="h", cache_path=tmp_path / "c", probe=p).accel == "kvm"


def test_cache_is_per_host_and_refreshable(tmp_path: Path):
    cache = tmp_path / "c.json"
    decide("auto", kvm_present=True, key="host-a", cache_path=cache, probe=FakeProbe(False))
    p = FakeProbe(True)
    # another kernel release / QEMU version = another key: probe again
    assert decide("auto", kvm_present=True, key="host-b", cache_path=cache, probe=p).accel == "kvm"
    assert p.calls == 1
    assert len(json.loads(cache.read_text())) == 2
    p2 = FakeProbe(True)
    c = decide("auto", kvm_present=True, key="host-a", cache_path=cache, probe=p2, refresh=True)
    assert c.accel == "kvm" and p2.calls == 1


def test_corrupt_cache_means_probe(tmp_path: Path):
    cache = tmp_path / "c.json"
    cache.write_text("{not json")
    p = FakeProbe(False)
    assert decide("auto", kvm_present=True, key="h", cache_path=cache, probe=p).accel == "tcg"
    assert p.calls == 1 and load_cached(cache, "h") is not None


@pytest.mark.guest
def test_real_probe_is_quick_and_its_verdict_boots(vm_image, tmp_path: Path):
    """Probe for real (ignoring the cache); whatever it picks must boot a guest."""
    from vm import Guest

    t0 = time.monotonic()
    choice = choose_accel("auto", "x86_64", vm_image, refresh=True)
    took = time.monotonic() - t0
    assert choice.accel in ("kvm", "tcg")
    assert took < 25, f"the probe took {took:.1f} s"
    again = choose_accel("auto", "x86_64", vm_image)
    assert again.accel == choice.accel
    if "probed now" in choice.reason:  # /dev/kvm was openable: the verdict is cached
        assert again.cached and probe_cache_path().is_file()
    with Guest(accel=choice.accel, name="probe-check", image=vm_image, log_dir=tmp_path,
               wait_ssh=False, ready_timeout=60) as g:
        assert g.accel == choice.accel and "ready" in g.timings
