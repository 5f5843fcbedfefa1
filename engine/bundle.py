"""The engine's compiled modules in one file, so that a ckpt run does not
look each one up (issue 15).

Every ckpt run imports ~45 engine modules. Through the ordinary import
system each costs a directory lookup, a stat of its source, an open, fstat
and read of its .pyc and a header check in importlib's Python code:
measured, the bundle saves ~1.2-1.6 ms of the imports of a small
process's dump or restore on the host (~7-8 ms of them). A bundle,
``engine/__pycache__/bundle.<cache tag>.bin``, holds every module's code
object as the import system would load it (its valid .pyc, else its
source compiled by the same ``compile`` call), and a finder at the front
of ``sys.meta_path`` serves ``engine.*`` from it: one stat of the source
and one read of the bundle per module.

Never stale, never required:

* An entry is used only while its source file is the very file it was
  compiled from: same device, inode, size, mtime and ctime (to the ns) as
  when the bundle read it. Any write, rename-over, touch or chmod changes
  the ctime, which no one can set back. A changed, new or removed source
  falls through to the ordinary import (its .pyc or source), module by
  module, as if there were no bundle. (The sources' content hashes are in
  the bundle too, for :func:`check`; reading every source at each start to
  hash it would cost a third of what the bundle saves.)
* The bundle is used only by the interpreter that wrote it (the same
  bytecode magic, -O level and pycache prefix) and for the engine
  directory it was built in (the code objects carry their file names,
  for tracebacks).
* Built explicitly (``python3 -m engine.mkbundle``, engine/mkbundle.py: run where compileall is:
  ``make``, the guests' engine install, the host compare), written whole
  under a temporary name and renamed; a missing, foreign or damaged bundle
  is ignored. A module whose bundle entry cannot be read is loaded the
  ordinary way.

Nothing else changes: module names, ``__file__``, ``__cached__``,
``__path__``, ``__spec__.origin`` are those of the ordinary import, and the
code objects are the same (tests/test_bundle.py).
"""

from __future__ import annotations

import marshal
import os
import sys

# The file: _TAG, the index (u32 length, marshal: what install() reads),
# the sources' hashes (u32 length, marshal: only for mkbundle.check), the
# code objects (marshal, each at its index entry's offset after the hashes).
_TAG = b"ckpt engine bundle 2\n"


def bundle_path(engine_dir: str) -> str:
    return os.path.join(engine_dir, "__pycache__", f"bundle.{sys.implementation.cache_tag}.bin")


def _magic() -> bytes:
    # importlib.util.MAGIC_NUMBER, without importing importlib.util
    return sys.modules["_frozen_importlib_external"].MAGIC_NUMBER


def _key(st) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Finder:
    """Serves the bundle's modules (find_spec) and loads them (the loader
    protocol: create_module, exec_module, get_code, get_source, is_package)."""

    def __init__(self, path: str, bundle_key: tuple, base: int, engine_dir: str, modules: dict):
        self.path = path
        self.bundle_key = bundle_key
        self.base = base
        self.engine_dir = engine_dir
        self.modules = modules
        self._spec = sys.modules["_frozen_importlib"].ModuleSpec

    def find_spec(self, name, path=None, target=None):
        e = self.modules.get(name)
        if e is None or "." not in name:
            return None         # (the package itself is imported before the finder exists)
        rel, pkg, cached = e[2], e[3], e[4]
        src = self.engine_dir + "/" + rel          # (paths made as the builder made them: "/" only)
        where = src.rpartition("/")[0]
        if path != [where.rpartition("/")[0] if pkg else where]:
            return None         # its package's __path__ is not the bundle's directory: not ours to say
        try:
            if _key(os.stat(src)) != e[5:]:
                return None     # changed since the bundle was built: the ordinary import
        except OSError:
            return None
        spec = self._spec(name, self, origin=src, is_package=pkg)
        spec.has_location = True
        spec.cached = self.engine_dir + "/" + cached
        if pkg:
            spec.submodule_search_locations = [where]
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exec(self.get_code(module.__spec__.name), module.__dict__)

    def _ordinary(self, name: str):
        e = self.modules[name]
        return sys.modules["_frozen_importlib_external"].SourceFileLoader(name, self.engine_dir + "/" + e[2])

    def get_code(self, name: str):
        e = self.modules[name]
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _key(os.fstat(fd)) != self.bundle_key:
                    raise OSError("the bundle was replaced")
                blob = os.pread(fd, e[1], self.base + e[0])
            finally:
                os.close(fd)
            if len(blob) == e[1]:
                return marshal.loads(blob)
        except (OSError, ValueError, EOFError, TypeError):
            pass
        return self._ordinary(name).get_code(name)     # unreadable entry: as if there were no bundle

    def get_source(self, name: str):
        return self._ordinary(name).get_source(name)

    def is_package(self, name: str) -> bool:
        return bool(self.modules[name][3])


def install(engine_dir: str, package: str) -> bool:
    """Put the bundle's finder first on sys.meta_path when the bundle in
    `engine_dir` fits this interpreter and that directory; False when there
    is none or it does not fit (the ordinary import then does it all)."""
    path = bundle_path(engine_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        key = _key(os.fstat(fd))
        start = len(_TAG) + 4
        head = os.pread(fd, start, 0)
        if head[:len(_TAG)] != _TAG:
            return False
        n = int.from_bytes(head[len(_TAG):], "little")
        raw = os.pread(fd, n + 4, start)
        if len(raw) != n + 4:
            return False
        index = marshal.loads(raw[:n])
        base = start + n + 4 + int.from_bytes(raw[n:], "little")     # past the hashes
    except (OSError, ValueError, EOFError, TypeError):
        return False
    finally:
        os.close(fd)
    if not (isinstance(index, dict) and index.get("magic") == _magic()
            and index.get("optimize") == sys.flags.optimize and index.get("engine_dir") == engine_dir
            and index.get("pycache_prefix") == sys.pycache_prefix
            and index.get("package") == package and isinstance(index.get("modules"), dict)):
        return False
    if any(isinstance(f, _Finder) and f.engine_dir == engine_dir for f in sys.meta_path):
        return True             # (the package imported again in this process)
    sys.meta_path.insert(0, _Finder(path, key, base, engine_dir, index["modules"]))
    return True
