"""The property every successful dump must have (issue 10 item 4): restore
on the same, unchanged machine succeeds. A dump that restore would refuse
kills the target for nothing: such a case must be refused by the dump's
pre-flight instead (target unharmed, no image).

Hooked into the shared helpers, so every host test that dumps gets it:

* full-process dumps (``engine.dump.dump``): the ``procs`` fixture of
  engine_core_support swaps ``engine.dump.ImageWriter`` for
  :class:`WatchedWriter`, which rehearses the restore of each image right
  after a dump that killed its target, before the test changes anything;
* fd-level dumps (``fds_support.dump``): rehearsed when the target is gone
  (``Target.__exit__``), unless the test restored that image itself (then
  the test's own restore is the check).

The rehearsal is the restore up to the creation of the process: the image
verified, the records checked, the whole pre-flight (every handler's
validate, every mapped file, cwd, credentials ...) with only `pid-in-use`
forgiven (the killed target is the test's unreaped child), then every fd,
mapping, exe and cwd opened as for the new process and closed again. Any
refusal, EngineError or Python exception there fails the test.
"""

from __future__ import annotations

import os
from typing import List

from engine import files
from engine.context import Options, RestoreContext, boot_id
from engine.errors import Refusal, Refusals
from engine.image import ImageReader, ImageWriter

FORGIVEN = {"pid-in-use"}


class NotRestorable(AssertionError):
    pass


def _only_forgiven(e: BaseException) -> bool:
    got = e.refusals if isinstance(e, Refusals) else [e]
    return all(isinstance(r, Refusal) and r.reason in FORGIVEN for r in got)


def machine_file_grew(e: BaseException) -> bool:
    """The refusal of a restore because a file of the machine (/proc/vmstat,
    /proc/stat) read to its end now runs past that end (engine/fds/
    procfile.py _grew): the machine changed since the dump (on a busy one
    a counter gained a digit), not a fault of the image."""
    return isinstance(e, Refusal) and e.reason == "pseudo-file" and "contents now run past" in str(e)


_SPARE = []


def _spare_tty() -> str:
    """/dev/pts/N of a pty this test process keeps open (one per process)."""
    if not _SPARE:
        import fcntl
        import struct
        m = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        fcntl.ioctl(m, 0x40045431, struct.pack("i", 0))          # TIOCSPTLCK 0
        _SPARE.append((m, "/dev/pts/%d" % struct.unpack("i", fcntl.ioctl(m, 0x80045430, bytes(4)))[0]))
    return _SPARE[0][1]


def rehearse_image(image_dir: str, options: Options = None) -> None:
    """Restore a full-process image up to creating the process (see the
    module doc). Raises NotRestorable."""
    from engine import restore as R
    options = options or Options()
    try:
        reader = ImageReader(image_dir)
        reader.check_arch()
        reader.verify(threads=2)
        core = reader.read_json("core.json")
        mm = reader.read_json("mm.json")
        fdrecs = reader.read_json("fds.json")
        R.check_core(core)
        vmas = R.check_mm(mm, mm["page_files"])
        R.check_fd_records(fdrecs)
        meta = reader.manifest.get("meta") or {}
        if any(r.get("kind") == "tty" and r.get("outside") for r in fdrecs) and not options.tty:
            # a --shell-job image: restored with --tty, here a fresh pty's slave
            from engine.plainclass import replace    # Options is a plainclass, not a dataclass
            options = replace(options, tty=_spare_tty())
            for r in fdrecs:
                if r.get("kind") == "tty" and r.get("outside"):
                    # its terminal must be the restoring shell's controlling one, which
                    # this test process is not: the rehearsal checks the rest
                    r["ctty"] = False
                    if r.get("tty") == "devtty":
                        r["tty"] = "slave"      # /dev/tty: ckpt's terminal, which the test process lacks
        ctx = RestoreContext(options=options, image=reader, same_node=meta.get("boot_id") == boot_id(),
                             records=fdrecs, pid=core["pid"])
        real_pid_free = R._pid_free
        R._pid_free = lambda pid: True       # the dumped PID is the test's zombie until reaped
        try:
            R.preflight(reader, core, vmas, fdrecs, ctx)
        except (Refusal, Refusals) as e:
            if not _only_forgiven(e):
                raise
        finally:
            R._pid_free = real_pid_free
        if "tree.json" not in reader.files and any(v["kind"] == "sysvshm" for v in vmas):
            # System V segments: their own pre-flight (engine/sysvshm.py; a tree's needs every member's)
            from engine import sysvshm
            found = sysvshm.preflight(sysvshm.segments([(core["pid"], v) for v in vmas if v["kind"] == "sysvshm"]),
                                      {core["pid"]})
            if found:
                raise Refusals(found)
        prepared = None
        try:
            prepared = R.prepare(core, vmas, fdrecs, ctx)
        except Refusal as e:
            if not machine_file_grew(e):
                raise
        finally:
            if prepared is not None:
                prepared.close()
            files.close_shared(ctx)
    except BaseException as e:   # noqa: BLE001 - any failure breaks the property
        raise NotRestorable(f"a successful dump of {image_dir} cannot be restored on the unchanged "
                            f"machine: {type(e).__name__}: {e}") from e


def rehearse_fds(image_dir: str, pid: int = None) -> None:
    """Restore an fd-level image (fds_support.dump) up to installing the
    fds: every record validated, then restored and closed. Raises
    NotRestorable."""
    from engine.fds import handler
    try:
        img = ImageReader(image_dir)
        img.verify()
        records = img.read_json("fds.json")
        ctx = RestoreContext(options=Options(), image=img, same_node=True, records=records, pid=pid)
        for rec in records:
            if rec.get("dup_of") is None:
                handler(rec["kind"]).validate(rec, ctx)
        opened: List[int] = []
        try:
            for rec in records:
                if rec.get("dup_of") is None:
                    opened.append(handler(rec["kind"]).restore(rec, ctx))
        finally:
            for fd in opened:
                if fd not in ctx.shared.get("_close_after_restore", []):
                    os.close(fd)
            files.close_shared(ctx)
    except BaseException as e:   # noqa: BLE001
        raise NotRestorable(f"a successful fd dump into {image_dir} cannot be restored on the unchanged "
                            f"machine: {type(e).__name__}: {e}") from e


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


class WatchedWriter(ImageWriter):
    """engine.dump's ImageWriter, rehearsing the restore of every image
    whose dump killed its target. `rehearsed` lists the images checked."""

    rehearsed: List[str] = []

    def commit(self, meta=None):
        self._meta_pid = (meta or {}).get("pid")
        return super().commit(meta)

    def __exit__(self, exc_type, exc, tb):
        out = super().__exit__(exc_type, exc, tb)
        pid = getattr(self, "_meta_pid", None)
        # --leave-running: the target runs on and holds its files, sockets
        # and PID: the world restore expects is not there yet; the test
        # restores (or not) once it has stopped it.
        if exc_type is None and pid and _gone(pid):
            rehearse_image(self.final)
            WatchedWriter.rehearsed.append(self.final)
        return out
