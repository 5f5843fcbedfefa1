"""Builds the engine's bundle (engine/bundle.py says what it is and when it
is used): ``python3 -m engine.mkbundle [ENGINE_DIR]``. Run wherever the
engine's bytecode is compiled: ``make``, the guests' engine install, the
host compare."""

from __future__ import annotations

import marshal
import os
import sys

from .bundle import _TAG, _key, _magic, bundle_path


def _sources(engine_dir: str, package: str):
    """(module name, path relative to engine_dir, is package) of every module
    the ordinary import would find there: packages are directories with an
    __init__.py, and a package shadows a module of the same name."""
    out = []
    for root, dirs, names in os.walk(engine_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and d.isidentifier()
                         and os.path.isfile(os.path.join(root, d, "__init__.py")))
        rel_root = os.path.relpath(root, engine_dir)
        prefix = package if rel_root == "." else package + "." + rel_root.replace(os.sep, ".")
        for n in sorted(names):
            stem = n[:-3]
            if not n.endswith(".py") or not stem.isidentifier():
                continue
            rel = n if rel_root == "." else os.path.join(rel_root, n)
            if stem == "__init__":
                out.append((prefix, rel, True))
            elif stem not in dirs:
                out.append((prefix + "." + stem, rel, False))
    return out


def _pyc_code(src: str, st, external):
    """The code object of `src`'s .pyc, marshalled, when the ordinary import
    would take that .pyc for the file as it is (a timestamp pyc of this
    interpreter naming its mtime and size, as SourceFileLoader checks),
    else None; its file name fixed as that import fixes it (a pyc compiled
    by a relative path names "engine/x.py"). (The guests' install ships or
    compiles these: compiling all again there would cost seconds of TCG
    CPU.)"""
    import _imp
    try:
        with open(external.cache_from_source(src), "rb") as f:
            data = f.read()
    except OSError:
        return None
    if (len(data) <= 16 or data[:4] != external.MAGIC_NUMBER or int.from_bytes(data[4:8], "little") != 0
            or int.from_bytes(data[8:12], "little") != int(st.st_mtime) & 0xFFFFFFFF
            or int.from_bytes(data[12:16], "little") != st.st_size & 0xFFFFFFFF):
        return None
    try:
        code = marshal.loads(data[16:])   # (a damaged one: compiled instead)
    except (ValueError, EOFError, TypeError):
        return None
    _imp._fix_co_filename(code, src)      # what SourceFileLoader's get_code does
    return marshal.dumps(code)


def build(engine_dir: str = "") -> tuple:
    """Bundle every module of the engine at `engine_dir` (default: this one):
    the code the ordinary import would run now (its valid .pyc, else the
    source compiled as SourceFileLoader compiles it). Returns (bundle path,
    number of modules)."""
    import _imp
    engine_dir = os.path.abspath(engine_dir or os.path.dirname(__file__))
    package = os.path.basename(engine_dir)
    external = sys.modules["_frozen_importlib_external"]
    modules, hashes, blobs, offset = {}, {}, [], 0
    for name, rel, pkg in _sources(engine_dir, package):
        src = os.path.join(engine_dir, rel)
        with open(src, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
            after = os.fstat(f.fileno())
        blob = _pyc_code(src, st, external) if sys.flags.optimize == 0 else None
        if blob is None:        # what SourceFileLoader.source_to_code does
            blob = marshal.dumps(compile(data, src, "exec", dont_inherit=True, optimize=-1))
        if _key(st) != _key(after) or _key(os.stat(src)) != _key(st):
            continue            # written to meanwhile: left to the ordinary import
        cached = os.path.relpath(external.cache_from_source(src), engine_dir)
        modules[name] = (offset, len(blob), rel, pkg, cached) + _key(st)
        hashes[name] = _imp.source_hash(external._RAW_MAGIC_NUMBER, data)
        blobs.append(blob)
        offset += len(blob)
    index = marshal.dumps({"magic": _magic(), "optimize": sys.flags.optimize, "engine_dir": engine_dir,
                           "pycache_prefix": sys.pycache_prefix,       # (where __cached__ points)
                           "package": package, "modules": modules})
    out = bundle_path(engine_dir)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            raw = marshal.dumps(hashes)
            f.write(_TAG + len(index).to_bytes(4, "little") + index + len(raw).to_bytes(4, "little") + raw)
            for b in blobs:
                f.write(b)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out, len(modules)


def check(engine_dir: str = "") -> list:
    """The names of the bundle's modules whose source no longer has the
    content it was compiled from (their entries are not used: their stat
    identity changed too); [] when all are current. For tests and doubt."""
    import _imp
    engine_dir = os.path.abspath(engine_dir or os.path.dirname(__file__))
    external = sys.modules["_frozen_importlib_external"]
    with open(bundle_path(engine_dir), "rb") as f:
        head = f.read(len(_TAG) + 4)
        index = marshal.loads(f.read(int.from_bytes(head[len(_TAG):], "little")))
        hashes = marshal.loads(f.read(int.from_bytes(f.read(4), "little")))
    stale = []
    for name, e in index["modules"].items():
        try:
            with open(os.path.join(engine_dir, e[2]), "rb") as f:
                if _imp.source_hash(external._RAW_MAGIC_NUMBER, f.read()) == hashes[name]:
                    continue
        except OSError:
            pass
        stale.append(name)
    return sorted(stale)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path, n = build(argv[0] if argv else "")
    print(f"ckpt bundle: {n} modules in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
