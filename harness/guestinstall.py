"""What a scenario guest runs, installed in one SSH command: the engine (and
the ``ckpt`` wrapper) and the harness's guest files as one tar stream, with
the bytecode the guest's python3 made of the same sources before.

Why: the files went in one SSH command each (~30, ~7 s of a TCG guest's
golden preparation) and both trees (~1 MB of source) were byte-compiled in
every guest of every run: 3-10 s of TCG CPU, idle to loaded. The bytecode
must be in the golden snapshot (a pyc written after it is lost at every
revert), but the same source compiled by the same python3 gives the same
code: so each pyc a guest compiles is kept on the host (:class:`PycCache`,
under the image cache) and shipped with that source next time; only what
changed is compiled in the guest.

Exact or not at all. A cached code object is found by the guest
interpreter's exact ``sys.version``, bytecode magic and cache tag, the
path the guest imports it from and the sha256 of the source bytes, and
each source goes into the tar as the very bytes looked up, with the mtime
and size its pyc's header names (so the guest's import takes that pyc for
that source and for no other). The guest checks the version stamp itself
(:data:`CHECK_OR_COMPILE`): on any difference every shipped pyc is deleted
and all is compiled there, as before.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from vm.recipe import bundle_line

ROOT = "/opt/crucible"                 # the guest's engine root (vm/guest.py GUEST_ENGINE_ROOT)
STAMP = ".pyc-by"                      # under ROOT: the sys.version of the guest the pyc files are for

#: The guest's python3 -S -c program, argv[1] the root, the rest the
#: sources (relative to it) shipped without bytecode: compile those when
#: the stamp is this interpreter's sys.version, else remove every
#: __pycache__ under the root and compile every source there (any failure:
#: a traceback and exit 1).
CHECK_OR_COMPILE = r"""
import os, sys
root, todo = sys.argv[1], sys.argv[2:]
try:
    with open(os.path.join(root, ".pyc-by")) as f:
        same = f.read() == sys.version
except OSError:
    same = False
if not same:
    import shutil
    todo = []
    for d, subdirs, files in os.walk(root):
        if "__pycache__" in subdirs:
            shutil.rmtree(os.path.join(d, "__pycache__"))
            subdirs.remove("__pycache__")
        todo += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")]
if todo:
    import py_compile
for rel in todo:
    py_compile.compile(os.path.join(root, rel), doraise=True)
"""

def version_line(python: str = "python3") -> str:
    """The guest shell line that prints its interpreter as JSON: sys.version,
    its bytecode magic, its pyc tag (:meth:`PycCache.for_guest`)."""
    return (f"{python} -S -c 'import json, sys, _frozen_importlib_external as e; "
            "sys.stdout.write(json.dumps([sys.version, e.MAGIC_NUMBER.hex(), sys.implementation.cache_tag]))'")


class PycCache:
    """Code objects (a pyc's bytes after its 16-byte header) one guest
    interpreter compiled, by (guest path, sha256 of the source)."""

    def __init__(self, root: Path, version: str, magic: bytes, tag: str):
        self.version, self.magic, self.tag = version, magic, tag
        key = hashlib.sha256(json.dumps([version, magic.hex(), tag]).encode()).hexdigest()[:24]
        self.dir = Path(root) / key

    @classmethod
    def for_guest(cls, root: Path, reply: str) -> Optional["PycCache"]:
        """From :func:`version_line`'s output (None: not understood)."""
        try:
            version, magic, tag = json.loads(reply)
            if not (isinstance(version, str) and version and isinstance(tag, str)
                    and re.fullmatch(r"[A-Za-z0-9_.-]+", tag)):
                return None
            return cls(root, version, bytes.fromhex(magic), tag)
        except (ValueError, TypeError):
            return None

    @staticmethod
    def key(guest_path: str, source: bytes) -> str:
        return hashlib.sha256(guest_path.encode() + b"\0" + source).hexdigest()

    def get(self, guest_path: str, source: bytes) -> Optional[bytes]:
        try:
            return (self.dir / (self.key(guest_path, source) + ".code")).read_bytes()
        except OSError:
            return None

    def put(self, guest_path: str, source: bytes, code: bytes) -> None:
        """Keep ``code`` (atomically: a reader sees all of it or none)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / (self.key(guest_path, source) + ".code")
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(code)
        os.replace(tmp, path)

    def header(self, mtime: int, size: int) -> bytes:
        """A timestamp pyc's header (PEP 552 flags 0) for a source of that mtime and size."""
        return self.magic + (0).to_bytes(4, "little") + (mtime & 0xFFFFFFFF).to_bytes(4, "little") + \
            (size & 0xFFFFFFFF).to_bytes(4, "little")

    def pyc_name(self, rel: str) -> str:
        """The pyc of the source ``rel`` (a path under ROOT): dir/__pycache__/name.TAG.pyc."""
        d, _, name = rel.rpartition("/")
        return f"{d + '/' if d else ''}__pycache__/{name[:-3]}.{self.tag}.pyc"


class Bundle:
    """The tar :func:`bundle` made: its bytes, and the sources it ships
    without bytecode (rel path -> (source bytes, mtime)) for :meth:`learn`."""

    def __init__(self, data: bytes, missing: Dict[str, Tuple[bytes, int]], cache: Optional[PycCache]):
        self.data, self.missing, self.cache = data, missing, cache

    def learn(self, tar_bytes: bytes) -> int:
        """Keep the guest's pyc files of the sources shipped without one
        (a tar of them, paths under ROOT); each only if its header is the
        one that source shipped with. Returns how many were kept."""
        if self.cache is None:
            return 0
        kept = 0
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            for rel, (source, mtime) in self.missing.items():
                try:
                    f = tar.extractfile(self.cache.pyc_name(rel))
                except KeyError:
                    continue
                data = f.read() if f else b""
                if len(data) > 16 and data[:16] == self.cache.header(mtime, len(source)):
                    self.cache.put(f"{ROOT}/{rel}", source, data[16:])
                    kept += 1
        return kept


def _sources(engine_dir: Path, harness_dir: Path, harness_files: Sequence[str]) -> List[Tuple[Path, str]]:
    """(host file, path in the tar = path under ROOT) of every file installed."""
    out = []
    for p in sorted(engine_dir.rglob("*")):
        rel = p.relative_to(engine_dir)
        if p.is_file() and "__pycache__" not in rel.parts and p.suffix != ".pyc":
            out.append((p, f"engine/{rel.as_posix()}"))
    out += [(harness_dir / name, f"harness/{name}") for name in harness_files]
    return out


def bundle(engine_dir: Path, harness_dir: Path, harness_files: Sequence[str], wrapper: str,
           cache: Optional[PycCache] = None) -> Bundle:
    """The tar (paths relative to ROOT, plus ``ckpt``: the wrapper), with a
    pyc for each source ``cache`` holds and the stamp of its interpreter."""
    buf = io.BytesIO()
    missing: Dict[str, Tuple[bytes, int]] = {}
    dirs = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def add(name: str, data: bytes, mode: int, mtime: int) -> None:
            parts = name.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    di = tarfile.TarInfo(d)
                    di.type, di.mode, di.mtime = tarfile.DIRTYPE, 0o755, mtime
                    tar.addfile(di)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, mtime
            tar.addfile(info, io.BytesIO(data))

        for src, rel in _sources(Path(engine_dir), Path(harness_dir), harness_files):
            st = src.stat()
            data = src.read_bytes()      # the bytes looked up are the bytes shipped
            mtime = int(st.st_mtime)
            add(rel, data, st.st_mode & 0o7777, mtime)
            if rel.endswith(".py"):
                code = cache.get(f"{ROOT}/{rel}", data) if cache is not None else None
                if code is None:
                    missing[rel] = (data, mtime)
                else:
                    add(cache.pyc_name(rel), cache.header(mtime, len(data)) + code, 0o644, mtime)
        if cache is not None:
            add(STAMP, cache.version.encode(), 0o644, 0)
        add("ckpt", wrapper.encode(), 0o755, 0)
    # gzip: the SSH channel into a TCG guest moves ~1.2 MB/s (its cipher is
    # the guest's CPU); ~3.7 MB of sources and bytecode go as ~1.3 MB
    return Bundle(gzip.compress(buf.getvalue(), 6), missing, cache)


def install_line(b: Bundle, python: str = "python3", root: str = ROOT,
                 wrapper_dest: str = "/usr/local/bin/ckpt") -> str:
    """The guest shell line that unpacks the bundle's tar from stdin
    (engine and harness replaced whole, the wrapper in place, the stamp or
    none as shipped), keeps the shipped bytecode and compiles the rest
    (:data:`CHECK_OR_COMPILE`) and prints ``uname -r``."""
    new = f"{root}/install.new"
    todo = " ".join(sorted(b.missing))
    return (f"set -e; rm -rf {new}; mkdir -p {new} {root}; tar -xz --no-same-owner -C {new} -f -; "
            f"rm -rf {root}/engine {root}/harness {root}/{STAMP}; "
            f"mv {new}/engine {root}/engine; mv {new}/harness {root}/harness; "
            f"if [ -e {new}/{STAMP} ]; then mv {new}/{STAMP} {root}/{STAMP}; fi; "
            f"mv {new}/ckpt {wrapper_dest}; rmdir {new}; "
            f"{python} -S -c '{CHECK_OR_COMPILE}' {root} {todo}; {bundle_line(python, root)}; uname -r")


def learn_line(b: Bundle, root: str = ROOT) -> Optional[str]:
    """The guest shell line that writes a tar of the pyc files compiled for
    the bundle's sources shipped without one (None: nothing to learn)."""
    if b.cache is None or not b.missing:
        return None
    names = " ".join(b.cache.pyc_name(rel) for rel in sorted(b.missing))
    return f"cd {root} && tar -c -f - --ignore-failed-read {names} 2>/dev/null; true"
