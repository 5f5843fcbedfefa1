"""engine/bundle.py: the engine's modules served from one file must be the
very modules the ordinary import gives (same code, same attributes), and a
bundle entry whose source changed in any way - even with its size and
mtime put back - must never be used; a bundle of another place or
interpreter, or a damaged one, is ignored. Each test works on a copy of
the engine (sources only, then compiled and bundled as `make bytecode`
does)."""

from __future__ import annotations

import json
import marshal
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine_core_support import procs, start_ready_script  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent

# Imports what a dump and a restore import, then prints, for every engine
# module loaded: its loader's kind and the attributes the import set.
PROBE = r"""
import json, sys
sys.path[0] = ROOT
import engine.cli, engine.dump, engine.restore, engine.show, engine.fds.pipe, engine.arch
from engine import bundle
out = {}
for name, m in sorted(sys.modules.items()):
    if name == "engine" or name.startswith("engine."):
        spec = m.__spec__
        out[name] = {"bundled": isinstance(m.__loader__, bundle._Finder),
                     "attrs": [m.__file__, getattr(m, "__cached__", None), getattr(m, "__path__", None),
                               m.__package__, spec.name, spec.origin, spec.parent, spec.has_location,
                               spec.submodule_search_locations, spec.cached]}
out["-meta_path"] = sum(isinstance(f, bundle._Finder) for f in sys.meta_path)
print(json.dumps(out))
"""


def _copy(dest: Path) -> Path:
    shutil.copytree(REPO / "engine", dest / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _build(root: Path) -> None:
    # compiled as `make bytecode` does: from the root, by a relative path (the
    # pyc files then name "engine/x.py"; the import system fixes that name at
    # load, and so must the bundle)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "engine"], check=True, cwd=str(root),
                   stdout=subprocess.DEVNULL, close_fds=True)
    r = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[0] = {str(root)!r}; "
                        "from engine.mkbundle import main; main([])"], capture_output=True, text=True, close_fds=True)
    assert r.returncode == 0, r.stderr
    assert (root / "engine" / "__pycache__" / f"bundle.{sys.implementation.cache_tag}.bin").is_file()


def _bundle_file(root: Path) -> Path:
    return root / "engine" / "__pycache__" / f"bundle.{sys.implementation.cache_tag}.bin"


def _probe(root: Path, extra: str = "") -> dict:
    r = subprocess.run([sys.executable, "-S", "-c", f"ROOT = {str(root)!r}\n" + PROBE + extra],
                       capture_output=True, text=True, timeout=120, close_fds=True, cwd=str(root))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[0])


@pytest.fixture
def built(tmp_path) -> Path:
    root = _copy(tmp_path / "root")
    _build(root)
    return root


def test_bundled_modules_are_the_ordinary_ones(built):
    got = _probe(built)
    assert got.pop("-meta_path") == 1
    # the package and engine/bundle.py itself: imported before the finder exists
    assert not got.pop("engine")["bundled"] and not got.pop("engine.bundle")["bundled"]
    assert len(got) > 30 and all(m["bundled"] for m in got.values()), [n for n, m in got.items() if not m["bundled"]]
    # the same code objects as the import system's own loader gives, for every module in the bundle
    same = subprocess.run([sys.executable, "-S", "-c", f"""
import marshal, sys
sys.path[0] = {str(built)!r}
import engine
from engine import bundle
f = [f for f in sys.meta_path if isinstance(f, bundle._Finder)][0]
bad = []
for name in f.modules:
    if "." in name:
        ours = f.get_code(name)
        theirs = f._ordinary(name).get_code(name)
        if marshal.dumps(ours) != marshal.dumps(theirs) or ours.co_filename != theirs.co_filename:
            bad.append(name)
print(len(f.modules), bad)
"""], capture_output=True, text=True, timeout=120, close_fds=True)
    n, bad = same.stdout.split(" ", 1)
    assert int(n) > 80 and bad.strip() == "[]", same.stderr
    # and the attributes the ordinary import sets, the same with the bundle gone
    _bundle_file(built).unlink()
    plain = _probe(built)
    assert plain.pop("-meta_path") == 0
    plain.pop("engine"), plain.pop("engine.bundle")
    assert sorted(plain) == sorted(got)
    assert {n: m["attrs"] for n, m in plain.items()} == {n: m["attrs"] for n, m in got.items()}
    assert not any(m["bundled"] for m in plain.values())


def test_a_changed_source_is_never_taken_from_the_bundle(built):
    errors = built / "engine" / "errors.py"
    text = errors.read_text()
    assert "EXIT_FAILED = 4" in text
    errors.write_text(text.replace("EXIT_FAILED = 4", "EXIT_FAILED = 44"))
    got = _probe(built, "import engine.errors; print(engine.errors.EXIT_FAILED)")
    assert not got["engine.errors"]["bundled"] and got["engine.dump"]["bundled"]
    r = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[0] = {str(built)!r}\n"
                        "import engine.errors; print(engine.errors.EXIT_FAILED)"],
                       capture_output=True, text=True, timeout=60, close_fds=True)
    assert r.stdout == "44\n", r.stderr
    # An edit that keeps the size, with the mtime put back (what a pyc's
    # check would not see): the ctime still tells, and the hash says why.
    restore = built / "engine" / "restore.py"
    st = restore.stat()
    body = restore.read_bytes()
    restore.write_bytes(body.replace(b"restore", b"RESTORE", 1))      # (in its docstring)
    os.utime(restore, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert restore.stat().st_size == st.st_size and restore.stat().st_mtime_ns == st.st_mtime_ns
    got = _probe(built)
    assert not got["engine.restore"]["bundled"] and got["engine.cli"]["bundled"]
    r = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[0] = {str(built)!r}\n"
                        "from engine import mkbundle; print(mkbundle.check())"],
                       capture_output=True, text=True, timeout=60, close_fds=True)
    assert r.stdout.strip() == "['engine.errors', 'engine.restore']", r.stderr
    # rebuilt: current again
    _build(built)
    got = _probe(built)
    assert got["engine.errors"]["bundled"] and got["engine.restore"]["bundled"]


def test_a_removed_or_new_module_is_the_ordinary_import(built):
    (built / "engine" / "show.py").rename(built / "engine" / "show2.py")
    r = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[0] = {str(built)!r}\n"
                        "try:\n import engine.show\nexcept ImportError: print('gone')\n"
                        "import engine.show2, engine.bundle as b; print(isinstance(engine.show2.__loader__, b._Finder))"],
                       capture_output=True, text=True, timeout=60, close_fds=True)
    assert r.stdout == "gone\nFalse\n", r.stderr


def _index(path: Path):
    from engine.bundle import _TAG as tag
    data = path.read_bytes()
    n = int.from_bytes(data[len(tag):len(tag) + 4], "little")
    return data, tag, marshal.loads(data[len(tag) + 4:len(tag) + 4 + n]), len(tag) + 4 + n


def test_a_bundle_of_another_place_or_interpreter_or_damaged_is_ignored(built, tmp_path):
    # copied elsewhere, __pycache__ and all: the code objects name the old paths
    moved = tmp_path / "moved"
    shutil.copytree(built, moved)
    got = _probe(moved)
    assert got["-meta_path"] == 0 and not got["engine.dump"]["bundled"]
    assert got["engine.dump"]["attrs"][0] == str(moved / "engine" / "dump.py")
    # another interpreter's bytecode magic
    data, tag, index, end = _index(_bundle_file(built))
    index["magic"] = b"\0\0\r\n"
    raw = marshal.dumps(index)
    _bundle_file(built).write_bytes(tag + len(raw).to_bytes(4, "little") + raw + data[end:])
    assert _probe(built)["-meta_path"] == 0
    # damaged: not a bundle at all, then cut short (entries past the end: the ordinary import)
    _bundle_file(built).write_bytes(b"\0" * 4096)
    assert _probe(built)["-meta_path"] == 0
    _build(built)
    data = _bundle_file(built).read_bytes()
    _bundle_file(built).write_bytes(data[:len(data) // 2])
    got = _probe(built)
    assert got["-meta_path"] == 1
    kinds = {m["bundled"] for n, m in got.items() if n.startswith("engine.") and n != "engine.bundle"}
    assert kinds == {True}      # found in the index; the load itself fell back where the bytes are missing
    r = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[0] = {str(built)!r}\n"
                        "import engine.dump, engine.restore, engine.survey, engine.imagecheck; print('ok')"],
                       capture_output=True, text=True, timeout=60, close_fds=True)
    assert r.stdout == "ok\n", r.stderr


def test_the_bundled_engine_dumps_and_restores(built, procs, tmp_path):  # noqa: F811
    p = start_ready_script(procs, tmp_path, "x = bytearray(1 << 20)")
    img = tmp_path / "img"
    loaders = tmp_path / "loaders"
    code = (f"import sys; sys.path[0] = {str(built)!r}\n"
            "import atexit\n"
            f"atexit.register(lambda: open({str(loaders)!r}, 'a').write("
            "' '.join(type(sys.modules[m].__loader__).__name__ for m in ('engine.cli', 'engine.restore')"
            " if m in sys.modules) + '\\n'))\n"
            "import engine.__main__")
    r = subprocess.run([sys.executable, "-S", "-c", code, "dump", "-t", str(p.pid), "-D", str(img), "--json"],
                       capture_output=True, text=True, timeout=120, close_fds=True)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stderr
    p.wait(timeout=30)
    r = subprocess.run([sys.executable, "-S", "-c", code, "restore", "-D", str(img), "--json"],
                       capture_output=True, text=True, timeout=120, close_fds=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    procs.adopt(out["result"]["pid"])
    assert os.path.exists(f"/proc/{out['result']['pid']}")
    assert loaders.read_text() == "_Finder\n_Finder _Finder\n"
