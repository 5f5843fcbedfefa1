import json
import os
import subprocess
import sys

import pytest

from engine.cli import parse_size
from engine.image import ImageWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ckpt(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("text,n", [("65536", 65536), ("64k", 65536), ("64M", 64 << 20),
                                    ("1G", 1 << 30), ("2GiB", 2 << 30), ("10 MB", 10 << 20)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("args,words", [
    (["dump", "-D", "/tmp/x"], "required: -t"),
    (["dump", "-t", "abc", "-D", "/tmp/x"], "not a PID"),
    (["dump", "-t", "0", "-D", "/tmp/x"], "not a PID"),
    (["dump", "-t", "1", "-D", "/tmp/x", "--ghost-limit", "lots"], "not a size"),
    (["restore"], "required: -D"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2_with_one_clear_line(args, words):
    r = ckpt(*args)
    assert r.returncode == 2
    assert words in r.stderr and "Traceback" not in r.stderr


def test_show_of_something_that_is_not_an_image(tmp_path):
    r = ckpt("show", "-D", str(tmp_path))
    assert r.returncode == 2 and "not a ckpt image" in r.stderr and "Traceback" not in r.stderr
    r = ckpt("show", "-D", str(tmp_path / "missing"), "--json")
    assert r.returncode == 2
    assert json.loads(r.stdout) == {"ok": False, "exit": 2, "error": "usage", "command": "show",
                                    "message": f"{tmp_path / 'missing'}: no such image directory", "errno": None}


def test_show_renders_an_image(tmp_path):
    d = tmp_path / "img"
    with ImageWriter(str(d)) as w:
        w.write_json("fds.json", [{"fd": 3, "kind": "regular", "flags": 0o2, "pos": 7, "cloexec": True,
                                   "link": "/srv/data"}])
        w.commit()
    r = ckpt("show", "-D", str(d))
    assert r.returncode == 0, r.stderr
    assert "/srv/data" in r.stdout and "regular" in r.stdout and "fds: 1" in r.stdout
    j = json.loads(ckpt("show", "-D", str(d), "--json").stdout)
    assert j["ok"] and j["result"]["records"]["fds.json"][0]["pos"] == 7


def test_incomplete_image_is_refused_by_name(tmp_path):
    (tmp_path / "img.partial").mkdir()
    r = ckpt("show", "-D", str(tmp_path / "img.partial"))
    assert r.returncode == 3 and "image-invalid" in r.stderr and "incomplete" in r.stderr
