"""A QEMU guest as an object: launch, run commands, copy files, snapshot, shut down.

Modelled on QEMU's ``QEMUMachine``: nothing starts until :meth:`Guest.launch`
(or ``with Guest(...)``); a failed launch cleans up first and then raises
:class:`VmError` carrying QEMU's exit code, command line, stderr and the serial
tail; :meth:`Guest.shutdown` always leaves no QEMU process behind, and all
cleanup lives in one ``_post_shutdown``.
"""

from __future__ import annotations

import atexit
import ctypes
import io
import os
import shlex
import shutil
import signal
import stat
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from . import recipe as R
from .arch import get_arch
from .argv import LaunchSpec, build_argv
from .errors import VmError
from .image import ImagePaths, ensure_image
from .qmp import Qmp
from .ssh import Command, RunResult, SshLink, as_shell

PathLike = Union[str, "os.PathLike[str]"]

GUEST_ENGINE_ROOT = "/opt/crucible"
OWNER_FILE = "owner.pid"

_LIVE: "weakref.WeakSet[Guest]" = weakref.WeakSet()


@atexit.register
def _kill_all_guests() -> None:
    """Last resort at interpreter exit: no QEMU outlives the harness."""
    for g in list(_LIVE):
        g.shutdown(hard=True)


def _set_pdeathsig() -> None:
    """In the QEMU child: die with the parent (prctl(2) PR_SET_PDEATHSIG).

    Covers a harness killed by SIGKILL, where neither atexit nor __exit__ run.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (bind to port 0).

    Another process may take it before QEMU binds it; :meth:`Guest.launch`
    retries with a new port when QEMU cannot set up the forwarding.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail_text(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def sweep_stale_dirs() -> None:
    """Remove per-guest temp dirs whose harness died without cleaning up
    (SIGKILL: no atexit ran). Only dirs with our owner file are touched."""
    for d in Path(tempfile.gettempdir()).glob("crucible-*"):
        try:
            pid = int((d / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's
    # A worker's L2 segment sockets (harness/pytest_plugin.py:
    # crucible-seg-<its pid>-<worker><guest>): QEMU binds them and never
    # removes them, and a worker killed mid-run cannot.
    for sock in Path(tempfile.gettempdir()).glob("crucible-seg-*-*"):
        try:
            pid = int(sock.name.split("-")[2])
            if not stat.S_ISSOCK(sock.lstat().st_mode):
                continue
            os.kill(pid, 0)
        except (ValueError, IndexError, OSError) as e:
            if isinstance(e, ProcessLookupError):
                sock.unlink(missing_ok=True)


class Guest:
    """One QEMU guest booted from the image on a private qcow2 overlay.

    Use as a context manager (``__enter__`` = :meth:`launch`, ``__exit__`` =
    :meth:`shutdown`). ``from_snapshot=(overlay, tag)`` starts a new guest
    from a copy of a snapshotted overlay with ``-loadvm tag`` instead of
    booting (see :meth:`export_overlay`).
    """

    def __init__(self, arch: str = "x86_64", accel: str = "auto", name: str = "guest",
                 log_dir: Optional[PathLike] = None, image: Optional[ImagePaths] = None,
                 memory_mb: int = 512, engine_dir: Optional[PathLike] = None, smp: int = 1,
                 ready_timeout: float = 60.0, ssh_timeout: float = 60.0,
                 from_snapshot: Optional[Tuple[PathLike, str]] = None,
                 extra_append: Optional[List[str]] = None, wait_ssh: bool = True,
                 tb_size_mb: int = 128, kernel: Optional[str] = None, distro: Optional[str] = None,
                 segment: Optional[Tuple[str, str, str]] = None):
        """``distro`` ("bookworm", "trixie"; see ``vm.recipe.DISTROS``) and
        ``kernel`` (one of the distro's kernel choices, e.g. "6.1",
        "backports"; default the distro's own) pick the image built when
        ``image`` is None; with an ``image`` they default to (and must
        match) the image's."""
        if distro is None:
            distro = image.distro if image is not None else R.DEFAULT_DISTRO
        if kernel is None:
            kernel = image.kernel_choice if image is not None else R.default_kernel(distro)
        if image is not None and (image.kernel_choice, image.distro) != (kernel, distro):
            raise VmError(f"Guest(distro={distro!r}, kernel={kernel!r}) but the image given is for "
                          f"{image.distro!r} kernel {image.kernel_choice!r}", kind="usage", guest=name)
        R.kernel_suite(kernel, distro)  # VmError(kind="usage") for an unknown choice, before any boot
        self.kernel = kernel
        self.distro = distro
        self.arch = arch
        self.accel_requested = accel
        self.accel: Optional[str] = None
        self.accel_reason = ""
        self.name = name
        self.log_dir = Path(log_dir).resolve() if log_dir is not None else None
        self.image = image
        self.memory_mb = memory_mb
        self.engine_dir = Path(engine_dir) if engine_dir is not None else None
        self.smp = smp
        self.ready_timeout = ready_timeout
        self.ssh_timeout = ssh_timeout
        self.from_snapshot = from_snapshot
        self.extra_append = list(extra_append or [])
        self.wait_ssh = wait_ssh
        self.tb_size_mb = tb_size_mb
        #: (local socket, remote socket, MAC) of a NIC on an L2 segment shared
        #: with another guest (vm/argv.py LaunchSpec.segment), or None
        self.segment = segment
        self.ssh_port: Optional[int] = None
        self.argv: List[str] = []
        self.timings: Dict[str, float] = {}
        self._proc: Optional[subprocess.Popen] = None
        self._tmp: Optional[Path] = None
        self._qmp: Optional[Qmp] = None
        self._ssh: Optional[SshLink] = None
        self._qemu_log_file: Any = None
        self.serial_log: Optional[Path] = None
        self.qemu_log: Optional[Path] = None
        self.overlay: Optional[Path] = None
        self.exit_code: Optional[int] = None
        #: console text from before this QEMU (a guest loaded from another
        #: one's snapshot: that boot's console), shown first by :meth:`serial_tail`
        self.console_before = ""

    # ----------------------------------------------------------- lifecycle
    def __enter__(self) -> "Guest":
        self.launch()
        return self

    def __exit__(self, *exc: Any) -> None:
        # After an exception nobody needs a graceful stop: kill fast.
        self.shutdown(hard=exc[0] is not None)

    def launch(self) -> "Guest":
        """Boot, wait for readiness and SSH, install the engine.

        Raises:
            VmError(kind="launch"): QEMU exited early (exit code, argv, stderr, serial tail).
            VmError(kind="timeout"): no readiness line / SSH in time (serial tail).
            VmError: image build or accelerator probe failures.
        """
        if self._proc is not None:
            raise VmError("launch() called on a guest that is already running", kind="usage", guest=self.name)
        t0 = time.monotonic()
        spec_arch = get_arch(self.arch)
        if self.image is None:
            self.image = ensure_image(self.arch, kernel=self.kernel, distro=self.distro)
        if self.accel is None:
            self.accel, self.accel_reason = self._resolve_accel()
        sweep_stale_dirs()
        self._tmp = Path(tempfile.mkdtemp(prefix=f"crucible-{self.name}-"))
        (self._tmp / OWNER_FILE).write_text(str(os.getpid()))
        logs = self.log_dir or self._tmp
        logs.mkdir(parents=True, exist_ok=True)
        self.serial_log = logs / f"{self.name}.serial.log"
        self.qemu_log = logs / f"{self.name}.qemu.log"
        # A previous boot's log could hold a stale readiness line until QEMU
        # truncates the file: remove it first.
        self.serial_log.unlink(missing_ok=True)
        try:
            self._prepare_overlay()
            self._start_qemu(spec_arch, t0)
            if self.from_snapshot is None:
                self._wait_ready(t0)
            if self.wait_ssh:
                self._ssh = SshLink(self.ssh_port or 0, self.image.ssh_key, self.name)
                self._connect_ssh()
                self.timings["ssh"] = time.monotonic() - t0
                if self.from_snapshot is not None:
                    self.sync_clock()
                else:
                    self.run("true", timeout=30, check=True)
                self.timings["first_command"] = time.monotonic() - t0
                if self.engine_dir is not None and self.from_snapshot is None:
                    self.install_engine(self.engine_dir)
                    self.timings["engine_installed"] = time.monotonic() - t0
        except BaseException as exc:
            err = self._launch_failure(exc)
            self.shutdown(hard=True)
            if err is not None:
                raise err from exc
            raise
        return self

    def _resolve_accel(self) -> Tuple[str, str]:
        from .accel import choose_accel  # accel's probe boots a Guest itself
        choice = choose_accel(self.accel_requested, self.arch, self.image)
        return choice.accel, choice.reason

    def _prepare_overlay(self) -> None:
        assert self._tmp is not None and self.image is not None
        self.overlay = self._tmp / "overlay.qcow2"
        if self.from_snapshot is not None:
            src = Path(self.from_snapshot[0])
            # cp --reflink=auto: a block-sharing copy where the fs allows it.
            subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(src), str(self.overlay)],
                           check=True, stdin=subprocess.DEVNULL)
            return
        res = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                              "-b", str(self.image.rootfs.resolve()), str(self.overlay)],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if res.returncode != 0:
            raise VmError("qemu-img could not create the overlay", kind="launch", guest=self.name,
                          command=res.args, rc=res.returncode, stderr=res.stderr)

    def _kernel_release(self) -> str:
        """The image's kernel release from its manifest ("" if unreadable)."""
        try:
            return str(self.image.info().get("kernel_release", ""))  # type: ignore[union-attr]
        except (OSError, ValueError):
            return ""

    def _start_qemu(self, arch_spec: Any, t0: float) -> None:
        assert self._tmp is not None and self.image is not None and self.overlay is not None
        for attempt in range(3):
            self.ssh_port = free_port()
            spec = LaunchSpec(name=self.name, kernel=str(self.image.kernel), initrd=str(self.image.initrd),
                              overlay=str(self.overlay), accel=self.accel or "tcg", ssh_port=self.ssh_port,
                              qmp_socket=str(self._tmp / "qmp.sock"), serial_log=str(self.serial_log),
                              memory_mb=self.memory_mb, smp=self.smp, tb_size_mb=self.tb_size_mb,
                              loadvm=self.from_snapshot[1] if self.from_snapshot else None,
                              extra_append=self.extra_append, kernel_release=self._kernel_release(),
                              agent_socket=str(self._tmp / "agent.sock"), segment=self.segment)
            if self.segment:
                try:
                    os.unlink(self.segment[0])     # QEMU binds it: a stale one from an earlier run
                except FileNotFoundError:
                    pass
            self.argv = build_argv(arch_spec, spec)
            self._qemu_log_file = open(self.qemu_log, "wb")  # type: ignore[arg-type]
            # New session: a Ctrl-C meant for `vm shell`'s ssh must not reach
            # QEMU. PDEATHSIG only from the main thread: it fires when the
            # forking *thread* exits (prctl(2)).
            main = threading.current_thread() is threading.main_thread()
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._qemu_log_file,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_set_pdeathsig if main else None)
            _LIVE.add(self)
            self.timings["qemu_started"] = time.monotonic() - t0
            self._qmp = Qmp(spec.qmp_socket, self.name)
            try:
                self._qmp.connect(time.monotonic() + 20, self.alive)
                return
            except VmError:
                if self._proc.poll() is not None and "hostfwd" in self._qemu_stderr() and attempt < 2:
                    self._qemu_log_file.close()
                    self._proc = None
                    continue  # the port was taken between our check and QEMU's bind
                raise

    def _wait_ready(self, t0: float) -> None:
        assert self.serial_log is not None
        deadline = t0 + self.ready_timeout
        marker = R.READY_MARKER.encode()
        while True:
            try:
                if marker in self.serial_log.read_bytes():
                    self.timings["ready"] = time.monotonic() - t0
                    return
            except OSError:
                pass
            if not self.alive():
                raise VmError("QEMU exited before the guest was ready", kind="launch", guest=self.name)
            if time.monotonic() >= deadline:
                raise VmError(f"guest not ready: no {R.READY_MARKER} line on the serial console "
                              f"within {self.ready_timeout:g} s", kind="timeout", guest=self.name,
                              timeout=self.ready_timeout, serial_tail=self.serial_tail(40) or "(serial log empty)")
            time.sleep(0.02)

    def _connect_ssh(self) -> None:
        assert self._ssh is not None
        try:
            self._ssh.connect(time.monotonic() + self.ssh_timeout, self.alive)
        except VmError as exc:
            if exc.kind == "ssh":
                raise VmError(f"SSH not answering on 127.0.0.1:{self.ssh_port}", kind="timeout",
                              guest=self.name, timeout=self.ssh_timeout, stderr=exc.message,
                              serial_tail=self.serial_tail(40)) from exc
            raise

    def _launch_failure(self, exc: BaseException) -> Optional[VmError]:
        """Turn a failure during launch into a VmError a person can act on."""
        if not isinstance(exc, Exception):
            return None  # KeyboardInterrupt & co: clean up, re-raise as is
        if self._proc is not None and self._proc.poll() is not None:
            return VmError("QEMU exited during launch", kind="launch", guest=self.name,
                           exit_code=self._proc.returncode, command=self.argv,
                           stderr=self._qemu_stderr() or "(no output)", serial_tail=self.serial_tail(40))
        if isinstance(exc, VmError):
            return None
        return VmError(f"launch failed: {type(exc).__name__}: {exc}", kind="launch", guest=self.name,
                       command=self.argv or None, serial_tail=self.serial_tail(40))

    def _qemu_stderr(self) -> str:
        return tail_text(self.qemu_log, 40) if self.qemu_log else ""

    def alive(self) -> bool:
        """True while the QEMU process runs."""
        return self._proc is not None and self._proc.poll() is None

    def shutdown(self, hard: bool = False, timeout: float = 30) -> None:
        """Stop QEMU: QMP ``quit`` (unless ``hard``), then SIGKILL; always reaps.

        Idempotent, never raises. The overlay goes with the guest: copy it
        first with :meth:`export_overlay` to keep it.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if self._ssh is not None:
                self._ssh.close()
            if not hard and self._qmp is not None:
                try:
                    self._qmp.command("quit", timeout=5)
                    proc.wait(timeout=timeout)
                except (VmError, subprocess.TimeoutExpired):
                    pass
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if proc is not None:
            while True:
                try:
                    proc.wait()
                    break
                except KeyboardInterrupt:
                    continue  # we must reap it; the interrupt is not lost for long
            self.exit_code = proc.returncode
        self._post_shutdown()

    def _post_shutdown(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._qemu_log_file is not None:
            self._qemu_log_file.close()
            self._qemu_log_file = None
        self._proc = None
        _LIVE.discard(self)
        if self.segment:
            try:
                os.unlink(self.segment[0])     # QEMU binds it and never removes it: one left a guest
            except OSError:
                pass
        if self._tmp is not None:
            if self.log_dir is None:
                # logs lived in the temp dir: keep their tail for post-mortems
                self._last_serial_tail = self.serial_tail(200)
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # ------------------------------------------------------------ commands
    def _require_running(self) -> None:
        """Raises VmError(kind="died") if QEMU is gone (and cleans up)."""
        if self._proc is None:
            raise VmError("guest is not running (never launched, or shut down)", kind="died", guest=self.name)
        if self._proc.poll() is not None:
            code = self._proc.returncode
            err = VmError(f"guest died: QEMU exited with {code}"
                          + (f" (killed by signal {-code})" if code < 0 else ""),
                          kind="died", guest=self.name, exit_code=code,
                          stderr=self._qemu_stderr(), serial_tail=self.serial_tail(20))
            self.shutdown(hard=True)
            raise err

    def _link(self) -> SshLink:
        self._require_running()
        if self._ssh is None:
            self._ssh = SshLink(self.ssh_port or 0, self.image.ssh_key, self.name)  # type: ignore[union-attr]
        if not self._ssh.connected:
            self._connect_ssh()
        return self._ssh

    def _exec(self, cmd: Command, timeout: float, stdin: Optional[bytes] = None) -> Tuple[int, bytes, bytes, float]:
        link = self._link()
        try:
            return link.exec(cmd, timeout, stdin)
        except VmError as exc:
            if exc.kind == "ssh":
                self._require_running()  # raises "guest died" if that is why
            raise

    def run(self, cmd: Command, timeout: float = 60, check: bool = False,
            stdin: Optional[bytes] = None) -> RunResult:
        """Run ``cmd`` in the guest as root (a string goes to the shell as is,
        a list is shlex-quoted). Never raises on a non-zero exit unless ``check``.

        Raises:
            VmError(kind="timeout"): still running after ``timeout`` seconds.
            VmError(kind="died"): QEMU is gone.
            VmError(kind="command"): ``check`` and rc != 0 (rc, stdout, stderr).
            VmError(kind="ssh"): the connection failed otherwise.
        """
        rc, out, err, dur = self._exec(cmd, timeout, stdin)
        res = RunResult(rc, out.decode(errors="replace"), err.decode(errors="replace"), dur)
        if check and rc != 0:
            raise VmError(f"command failed: {as_shell(cmd)}", kind="command", guest=self.name,
                          rc=rc, stdout=res.stdout[-4000:], stderr=res.stderr[-4000:])
        return res

    def run_bytes(self, cmd: Command, timeout: float = 60) -> bytes:
        """The stdout of ``cmd`` as bytes (a tar, say); VmError(kind="command")
        on a non-zero exit, the others as :meth:`run`."""
        rc, out, err, _ = self._exec(cmd, timeout)
        if rc != 0:
            raise VmError(f"command failed: {as_shell(cmd)}", kind="command", guest=self.name,
                          rc=rc, stderr=err.decode(errors="replace")[-4000:])
        return out

    def put_bytes(self, data: bytes, remote_path: str, mode: Optional[int] = None, timeout: float = 120) -> None:
        """Write ``data`` to ``remote_path`` (parent directories created).

        Raises:
            VmError(kind="command"): the guest could not write it.
        """
        q = shlex.quote(remote_path)
        line = f"mkdir -p -- \"$(dirname -- {q})\" && cat > {q}"
        if mode is not None:
            line += f" && chmod {mode & 0o7777:o} -- {q}"
        rc, _, err, _ = self._exec(line, timeout, stdin=data)
        if rc != 0:
            raise VmError(f"cannot write {remote_path} in the guest", kind="command", guest=self.name,
                          rc=rc, stderr=err.decode(errors="replace"))

    def get_bytes(self, remote_path: str, timeout: float = 120) -> bytes:
        """The contents of ``remote_path`` in the guest.

        Raises:
            VmError(kind="command"): missing or unreadable.
        """
        rc, out, err, _ = self._exec(["cat", "--", remote_path], timeout)
        if rc != 0:
            raise VmError(f"cannot read {remote_path} in the guest", kind="command", guest=self.name,
                          rc=rc, stderr=err.decode(errors="replace"))
        return out

    def put(self, local_path: PathLike, remote_path: str, timeout: float = 120) -> None:
        """Copy a host file into the guest, keeping its permission bits."""
        p = Path(local_path)
        self.put_bytes(p.read_bytes(), remote_path, mode=p.stat().st_mode, timeout=timeout)

    def get(self, remote_path: str, local_path: PathLike, timeout: float = 120) -> None:
        """Copy a guest file to the host."""
        Path(local_path).write_bytes(self.get_bytes(remote_path, timeout=timeout))

    def install_engine(self, path: PathLike) -> float:
        """Copy the engine package to /opt/crucible/engine as one tar stream
        (one SSH command), replacing any previous copy; returns seconds.

        Raises:
            VmError(kind="usage"): ``path`` is not a directory.
            VmError(kind="command"): extraction failed in the guest.
        """
        src = Path(path)
        if not src.is_dir():
            raise VmError(f"engine directory {src} does not exist", kind="usage", guest=self.name)
        buf = io.BytesIO()

        def skip_caches(info: tarfile.TarInfo) -> Optional[tarfile.TarInfo]:
            if "__pycache__" in info.name.split("/") or info.name.endswith(".pyc"):
                return None
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(str(src), arcname="engine", filter=skip_caches)
            wrapper = R.CKPT_WRAPPER_FAST.encode()
            info = tarfile.TarInfo("ckpt")
            info.size, info.mode = len(wrapper), 0o755
            tar.addfile(info, io.BytesIO(wrapper))
        root = GUEST_ENGINE_ROOT
        line = (f"rm -rf {root}/engine.new && mkdir -p {root}/engine.new && "
                f"tar -x --no-same-owner -C {root}/engine.new -f - && rm -rf {root}/engine && "
                f"mv {root}/engine.new/engine {root}/engine && "
                # the image's wrapper, replaced by the current one (vm/recipe.py CKPT_WRAPPER_FAST)
                f"mv {root}/engine.new/ckpt /usr/local/bin/ckpt && rmdir {root}/engine.new && "
                # Bytecode now, before any snapshot: a pyc written later is
                # lost at every revert, and compiling the engine costs each
                # ckpt run ~35 ms of CPU (more under TCG) - a third of a
                # small process's dump.
                f"python3 -m compileall -q {root}/engine >/dev/null && {R.bundle_line('python3', root)}")
        rc, _, err, dur = self._exec(line, 120, stdin=buf.getvalue())
        if rc != 0:
            raise VmError("installing the engine failed", kind="command", guest=self.name,
                          rc=rc, stderr=err.decode(errors="replace"))
        return dur

    def sync_clock(self) -> None:
        """Set the guest's wall clock to the host's (a loadvm rewinds it)."""
        self.run(["date", "-u", "-s", f"@{time.time():.3f}"], timeout=30, check=True)

    # ----------------------------------------------------------- snapshots
    def snapshot(self, name: str) -> float:
        """``savevm name`` (replaces a snapshot of that name); returns seconds.

        SSH is dropped first so the snapshot holds no live host connection.

        Raises:
            VmError(kind="qmp"): QEMU refused (message from HMP).
        """
        self._require_running()
        assert self._qmp is not None
        if self._ssh is not None:
            self._ssh.close()
        t0 = time.monotonic()
        out = self._qmp.hmp(f"savevm {name}")
        if out.strip():
            raise VmError(f"savevm {name} failed: {out.strip()}", kind="qmp", guest=self.name)
        return time.monotonic() - t0

    def status(self, timeout: float = 5) -> str:
        """QMP ``query-status``'s status ("running", "paused", ...).

        Raises:
            VmError(kind="qmp"): QEMU did not answer within ``timeout`` s
                (stopped by a signal, wedged) or is gone.
        """
        self._require_running()
        assert self._qmp is not None
        return str(self._qmp.command("query-status", timeout=timeout).get("status"))

    @property
    def agent_socket(self) -> Optional[str]:
        """The host end of the agent's virtio-serial port (None: not running)."""
        return str(self._tmp / "agent.sock") if self._tmp is not None and self.alive() else None

    def pid(self) -> Optional[int]:
        """QEMU's PID while it runs (for chaos tests that stop or kill it)."""
        return self._proc.pid if self.alive() else None  # type: ignore[union-attr]

    def revert(self, name: str, reconnect: bool = True) -> float:
        """``loadvm name``, reconnect SSH, set the clock; returns seconds.
        ``reconnect=False``: neither (the caller reaches the guest another
        way — the harness's agent — and sets the clock itself).

        Raises:
            VmError(kind="qmp"): no such snapshot or QEMU refused.
            VmError(kind="timeout"): SSH did not come back.
        """
        self._require_running()
        assert self._qmp is not None
        if self._ssh is not None:
            self._ssh.close()  # a loadvm strands the old TCP connection
        t0 = time.monotonic()
        out = self._qmp.hmp(f"loadvm {name}")
        if out.strip():
            # QEMU 7.2's hmp_loadvm stops the VM first and restarts it only
            # when the load succeeded: resume it, the guest is unchanged.
            if self._qmp.command("query-status").get("status") != "running":
                self._qmp.command("cont")
            raise VmError(f"loadvm {name} failed: {out.strip()}", kind="qmp", guest=self.name)
        # loadvm keeps a stopped VM stopped (a `stop` before it, a chaos test):
        # a reverted guest runs.
        if self._qmp.command("query-status").get("status") != "running":
            self._qmp.command("cont")
        if reconnect:
            self._link()
            self.sync_clock()
        return time.monotonic() - t0

    def export_overlay(self, dest: PathLike) -> None:
        """Copy this guest's overlay (with its internal snapshots) to ``dest``,
        for new guests started with ``from_snapshot=(dest, tag)``.

        The guest is paused around the copy: a QMP ``stop`` drains and flushes
        all block devices (QEMU's vm_stop), so the copy is consistent.
        """
        self._require_running()
        assert self._qmp is not None and self.overlay is not None
        self._qmp.command("stop")
        try:
            subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(self.overlay), str(dest)],
                           check=True, stdin=subprocess.DEVNULL)
        finally:
            self._qmp.command("cont")

    # ------------------------------------------------------------ for people
    def serial_tail(self, lines: int = 40) -> str:
        """The last lines of the serial console log; a kernel panic's reason
        line first when the call trace after it is longer than the tail
        (its length varies from boot to boot: the reason is what a person
        needs)."""
        if self.serial_log is not None and self.serial_log.exists():
            text = tail_text(self.serial_log, 1000)
        else:
            text = getattr(self, "_last_serial_tail", "")
        before = getattr(self, "console_before", "")     # (a Guest made without __init__ in tests has none)
        if before:
            text = before.rstrip("\n") + "\n" + text
        all_lines = text.splitlines()
        tail = all_lines[-lines:]
        panic = [ln for ln in all_lines[:-lines or None] if "Kernel panic" in ln][-1:] if len(all_lines) > lines else []
        return "\n".join(panic + (["[...]"] if panic else []) + tail)

    def ssh_command(self) -> str:
        """A copy-pasteable ssh command line into this guest."""
        assert self.image is not None
        return shlex.join(["ssh", "-i", str(self.image.ssh_key), "-p", str(self.ssh_port),
                           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-o", "LogLevel=ERROR", "root@127.0.0.1"])

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"<Guest {self.name} {self.arch} {self.accel or self.accel_requested} {state} ssh:{self.ssh_port}>"
