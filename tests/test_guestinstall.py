"""harness/guestinstall.py: the guest's install bundle, unpacked here by its
own shell line into a temporary root (the guest layout), with this host's
python3 standing in for the guest's, and its bytecode cache."""

import importlib.util
import io
import marshal
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from harness import guestinstall as gi
from harness import targets
from harness.targets import REPO

FILES = targets.guest_files() + ["agent.py"]


def _sh(line: str, data: bytes = b"") -> bytes:
    r = subprocess.run(["sh", "-c", line], input=data, capture_output=True, close_fds=True)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def _cache(tmp_path: Path, version_json: str = "") -> gi.PycCache:
    c = gi.PycCache.for_guest(tmp_path / "pyc", version_json or _sh(gi.version_line(sys.executable)).decode())
    assert c is not None and c.version == sys.version
    return c


def _install(root: Path, b: gi.Bundle) -> Path:
    out = _sh(gi.install_line(b, sys.executable, str(root), str(root.parent / "ckpt")), b.data)
    assert out.decode().strip().splitlines()[-1] == os.uname().release
    return root


def _pyc_ok(src: Path) -> bool:
    """The pyc import would take for ``src``: header matching the file as
    it is (magic, flags, mtime, size) and the code of exactly its bytes."""
    pyc = Path(importlib.util.cache_from_source(str(src)))
    try:
        data = pyc.read_bytes()
    except FileNotFoundError:
        return False
    st = src.stat()
    if data[:4] != importlib.util.MAGIC_NUMBER or int.from_bytes(data[4:8], "little") != 0:
        return False
    if int.from_bytes(data[8:12], "little") != int(st.st_mtime) & 0xFFFFFFFF or \
            int.from_bytes(data[12:16], "little") != st.st_size & 0xFFFFFFFF:
        return False
    return marshal.loads(data[16:]) == compile(src.read_bytes(), str(src), "exec", dont_inherit=True)


def _bad(root: Path):
    return [str(p) for p in root.rglob("*.py") if not _pyc_ok(p)]


def test_first_install_compiles_all_learns_it_and_the_next_ships_it(tmp_path):
    cache = _cache(tmp_path)
    b1 = gi.bundle(REPO / "engine", REPO / "harness", FILES, "#!/bin/sh\n", cache)
    n = len(list((REPO / "engine").rglob("*.py"))) + len([f for f in FILES if f.endswith(".py")])
    assert len(b1.missing) == n
    root1 = _install(tmp_path / "one" / "opt", b1)
    assert not _bad(root1)
    # the engine's bundle (engine/bundle.py), built there after the bytecode, current
    assert (root1 / "engine" / "__pycache__" / f"bundle.{sys.implementation.cache_tag}.bin").is_file()
    assert _sh(f"{sys.executable} -S -c 'import sys; sys.path[0] = \"{root1}\"; "
               "from engine import mkbundle; print(mkbundle.check())'") == b"[]\n"
    # the layout: every source, the repo's bytes and modes; the wrapper
    assert {p.relative_to(root1 / "engine") for p in (root1 / "engine").rglob("*.py")} == \
        {p.relative_to(REPO / "engine") for p in (REPO / "engine").rglob("*.py")}
    for name in FILES:
        assert (root1 / "harness" / name).read_bytes() == (REPO / "harness" / name).read_bytes()
        assert (root1 / "harness" / name).stat().st_mode & 0o777 == (REPO / "harness" / name).stat().st_mode & 0o777
    assert (tmp_path / "one" / "ckpt").read_text() == "#!/bin/sh\n" and os.access(tmp_path / "one" / "ckpt", os.X_OK)
    assert b1.learn(_sh(gi.learn_line(b1, str(root1)))) == n

    b2 = gi.bundle(REPO / "engine", REPO / "harness", FILES, "#!/bin/sh\n", cache)
    assert b2.missing == {} and gi.learn_line(b2) is None
    root2 = _install(tmp_path / "two" / "opt", b2)
    assert not _bad(root2)
    with tarfile.open(fileobj=io.BytesIO(b2.data)) as t:     # shipped, not compiled there
        pycs = {m.name: m for m in t.getmembers() if m.name.endswith(".pyc")}
        assert len(pycs) == n
        for name, m in pycs.items():
            assert (root2 / name).read_bytes() == t.extractfile(m).read()
            assert int((root2 / name).stat().st_mtime) == m.mtime


def test_a_changed_source_is_compiled_again_not_given_the_old_code(tmp_path):
    cache = _cache(tmp_path)
    eng = tmp_path / "engine"
    shutil.copytree(REPO / "engine", eng, ignore=shutil.ignore_patterns("__pycache__"))
    b1 = gi.bundle(eng, REPO / "harness", FILES, "", cache)
    b1.learn(_sh(gi.learn_line(b1, str(_install(tmp_path / "one" / "opt", b1)))))
    src = eng / "reasons.py"
    st = src.stat()
    text = src.read_text()
    src.write_text(text.replace("=", "=", 1) + "\n# changed\n")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))     # an edit the mtime does not show
    b2 = gi.bundle(eng, REPO / "harness", FILES, "", cache)
    assert list(b2.missing) == ["engine/reasons.py"]
    root2 = _install(tmp_path / "two" / "opt", b2)
    assert not _bad(root2)


def test_a_stamp_of_another_version_means_all_compiled_here(tmp_path):
    """Bytecode cached for another interpreter (same magic and tag, another
    build) is shipped with its stamp; the guest's check deletes it all and
    compiles every source itself."""
    mine = _sh(gi.version_line(sys.executable)).decode()
    other = gi.PycCache.for_guest(tmp_path / "pyc", mine.replace("[\"3.", "[\"3.0.0 another build 3.", 1))
    assert other is not None and other.version != sys.version
    b0 = gi.bundle(REPO / "engine", REPO / "harness", FILES, "", other)
    for rel, (source, _) in b0.missing.items():
        other.put(f"{gi.ROOT}/{rel}", source, marshal.dumps(compile("raise SystemExit('wrong code')", rel, "exec")))
    b = gi.bundle(REPO / "engine", REPO / "harness", FILES, "", other)
    assert b.missing == {}
    root = _install(tmp_path / "opt", b)
    assert (root / gi.STAMP).read_text() == other.version
    assert not _bad(root)


def test_no_cache_ships_no_bytecode_and_the_guest_compiles_all(tmp_path):
    assert gi.PycCache.for_guest(tmp_path, "Python 3.11.2") is None     # not the JSON line: no cache
    b = gi.bundle(REPO / "engine", REPO / "harness", FILES, "", None)
    with tarfile.open(fileobj=io.BytesIO(b.data)) as t:
        assert not [n for n in t.getnames() if n.endswith(".pyc") or n == gi.STAMP]
    assert gi.learn_line(b) is None
    assert not _bad(_install(tmp_path / "opt", b))


def test_learn_keeps_only_a_pyc_of_the_source_shipped(tmp_path):
    cache = _cache(tmp_path)
    b = gi.bundle(REPO / "engine", REPO / "harness", ["agent.py"], "", cache)
    rel = "harness/agent.py"
    source, mtime = b.missing[rel]
    good = cache.header(mtime, len(source)) + marshal.dumps(compile(source, rel, "exec"))

    def tar(data: bytes) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            info = tarfile.TarInfo(cache.pyc_name(rel))
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        return buf.getvalue()
    for wrong in (cache.header(mtime + 1, len(source)), cache.header(mtime, len(source) + 1),
                  b"\0\0\0\0" + cache.header(mtime, len(source))[4:]):
        assert b.learn(tar(wrong + good[16:])) == 0
    assert cache.get(f"{gi.ROOT}/{rel}", source) is None
    assert b.learn(tar(good)) == 1
    assert cache.get(f"{gi.ROOT}/{rel}", source) == good[16:]
