"""``python3 -m vm``: image, shell, show-command, probe-accel, cache-key, bench, survey.

Exit codes: 0 done, 1 a guest/build failure, 2 usage or missing host tools.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from .errors import VmError
from .recipe import DEFAULT_DISTRO, DEFAULT_KERNELS, DISTROS, axis_name, kernel_suite

REPO = Path(__file__).resolve().parent.parent
USAGE_KINDS = ("usage", "host-tools", "unsupported")


def _say(msg: str) -> None:
    print(f"[vm] {msg}", file=sys.stderr, flush=True)


def cmd_image(args: argparse.Namespace) -> int:
    from .image import ensure_image

    img = ensure_image(args.arch, force=args.force, kernel=args.kernel, force_rootfs=args.force_rootfs,
                       distro=args.distro)
    info = img.info()
    _say(f"{args.arch} {args.distro} kernel {info['kernel_release']} ({args.kernel}), rootfs {info['rootfs_mb']} MiB "
         f"({info['rootfs_allocated_mb']} MiB allocated), initrd {info['initrd_kb']} KiB")
    print(img.dir)
    return 0


def cmd_show_command(args: argparse.Namespace) -> int:
    from .accel import host_key, load_cached, probe_cache_path
    from .arch import get_arch
    from .argv import LaunchSpec, build_argv
    from .guest import free_port
    from .image import image_paths

    spec = get_arch(args.arch)
    img = image_paths(args.arch, args.kernel, args.distro)
    accel = args.accel
    if accel == "auto" and not spec.kvm_possible():
        accel = "tcg"
        _say(f"accel auto -> tcg (KVM cannot run {args.arch} guests on this host)")
    if accel == "auto":
        hit = load_cached(probe_cache_path(), f"{args.arch} | {host_key(spec.qemu_binary)}")
        accel = hit["accel"] if hit else "tcg"
        _say(f"accel auto -> {accel} ({'cached probe' if hit else 'not probed yet; run probe-accel'})")
    if not img.exists():
        _say(f"image not built yet: {img.dir} (python3 -m vm image --arch {args.arch} "
             f"--distro {args.distro} --kernel {args.kernel})")
    tmp = f"/tmp/crucible-{args.name}"
    _say(f"overlay: qemu-img create -f qcow2 -F raw -b {img.rootfs} {tmp}/overlay.qcow2")
    argv = build_argv(spec, LaunchSpec(
        name=args.name, kernel=str(img.kernel), initrd=str(img.initrd), overlay=f"{tmp}/overlay.qcow2",
        accel=accel, ssh_port=free_port(), qmp_socket=f"{tmp}/qmp.sock",
        serial_log=f"{tmp}/{args.name}.serial.log", memory_mb=args.memory,
        kernel_release=str(img.info().get("kernel_release", "")) if img.exists() else ""))
    print(shlex.join(argv))
    return 0


def cmd_probe_accel(args: argparse.Namespace) -> int:
    from .accel import choose_accel
    from .image import ensure_image

    choice = choose_accel("auto", args.arch, ensure_image(args.arch, kernel=args.kernel, distro=args.distro), refresh=args.refresh)
    print(f"{choice.accel}\t{choice.reason}")
    return 0


def _interactive_paramiko(g: "object") -> int:
    """Fallback when the ssh client is absent: a raw-tty paramiko shell."""
    import select
    import termios
    import tty

    size = shutil.get_terminal_size()
    chan = g._link()._client.get_transport().open_session()  # type: ignore[attr-defined]
    chan.get_pty(term=os.environ.get("TERM", "xterm"), width=size.columns, height=size.lines)
    chan.invoke_shell()
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd) if os.isatty(fd) else None
    inputs = [chan, fd]
    try:
        if old is not None:
            tty.setraw(fd)
        while True:
            r, _, _ = select.select(inputs, [], [], 0.5)
            if chan.recv_ready():
                os.write(sys.stdout.fileno(), chan.recv(4096))
            elif chan.closed or chan.eof_received:
                break
            if fd in r:
                data = os.read(fd, 1024)
                if data:
                    chan.sendall(data)
                else:  # our stdin ended: pass the EOF on, keep the output coming
                    inputs.remove(fd)
                    chan.shutdown_write()
    finally:
        if old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
    # returns -1 if the channel closed without a status (paramiko sets the
    # status event on close too, so this does not block forever)
    return chan.recv_exit_status()


def cmd_shell(args: argparse.Namespace) -> int:
    from .guest import Guest
    from .image import ensure_image

    img = ensure_image(args.arch, kernel=args.kernel, distro=args.distro)
    engine = Path(args.engine_dir) if args.engine_dir else REPO / "engine"
    g = Guest(arch=args.arch, accel=args.accel, name="shell", image=img, kernel=args.kernel, memory_mb=args.memory,
              engine_dir=engine if engine.is_dir() else None, log_dir=args.log_dir)
    _say(f"booting ({args.accel}) ...")
    try:
        g.launch()
        _say(f"accel: {g.accel} ({g.accel_reason}); ready in {g.timings.get('first_command', 0):.1f} s; "
             f"engine {'at /opt/crucible/engine' if g.engine_dir else 'NOT installed'}")
        _say(f"serial log: {g.serial_log}")
        _say(f"from another terminal: {g.ssh_command()}")
        if shutil.which("ssh"):
            rc = subprocess.call(shlex.split(g.ssh_command()))
        else:
            rc = _interactive_paramiko(g)
    finally:
        g.shutdown()
        _say("guest shut down")
    return rc


def cmd_cache_key(args: argparse.Namespace) -> int:
    """Print the cache keys of ``--arch``/``--distro``/``--kernel`` (CI
    caches on them): the names of the cache entries, bookworm's without
    the distro as before the distro axis."""
    from .image import image_paths
    from .rootfs import rootfs_paths

    prefix = axis_name(args.arch, args.kernel, args.distro)
    if args.what == "rootfs":
        print(f"{prefix}-{rootfs_paths(args.arch, args.kernel, args.distro).rootfs_hash}")
    else:
        print(f"{prefix}-{image_paths(args.arch, args.kernel, args.distro).recipe_hash}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    run_bench(Path(args.out), arch=args.arch, accel=args.accel, runs=args.runs,
              engine_dir=REPO / "engine", kernel=args.kernel, distro=args.distro)
    return 0


def cmd_survey(args: argparse.Namespace) -> int:
    from .survey import report_paths, run_survey, summary_line

    engine = Path(args.engine_dir) if args.engine_dir else REPO / "engine"
    result = run_survey(Path(args.out), arch=args.arch, kernel=args.kernel, accel=args.accel,
                        engine_dir=engine, settle_s=args.settle, distro=args.distro)
    jpath, hpath = report_paths(Path(args.out), args.arch, args.kernel, args.distro)
    _say(f"survey {args.arch} {args.distro} kernel {args.kernel}: {summary_line(result)}")
    print(jpath)
    print(hpath)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m vm", description="Crucible guest VMs")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser, accel: bool = True) -> None:
        sp.add_argument("--arch", default=os.environ.get("ARCH", "x86_64"))
        sp.add_argument("--distro", default=os.environ.get("DISTRO") or DEFAULT_DISTRO,
                        help=f"guest distro: {' | '.join(DISTROS)} (default {DEFAULT_DISTRO}; env DISTRO)")
        sp.add_argument("--kernel", default=os.environ.get("KERNEL") or None,
                        help="guest kernel: " + "; ".join(f"{d}: {' | '.join(k)}" for d, k in DISTROS.items())
                        + " (default: the distro's own, " + ", ".join(f"{d} {k}" for d, k in DEFAULT_KERNELS.items())
                        + "; env KERNEL)")
        if accel:
            sp.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")

    sp = sub.add_parser("image", help="build (or reuse) the guest image; prints its directory")
    common(sp, accel=False)
    sp.add_argument("--force", action="store_true", help="rebuild the image (reuses the cached rootfs)")
    sp.add_argument("--force-rootfs", action="store_true", help="redo mmdebstrap too (slow for aarch64)")
    sp.set_defaults(func=cmd_image)

    sp = sub.add_parser("shell", help="boot a guest and open an SSH shell in it")
    common(sp)
    sp.add_argument("--memory", type=int, default=512)
    sp.add_argument("--engine-dir", default=None)
    sp.add_argument("--log-dir", default=None)
    sp.set_defaults(func=cmd_shell)

    sp = sub.add_parser("show-command", help="print the QEMU command line, launch nothing")
    common(sp)
    sp.add_argument("--memory", type=int, default=512)
    sp.add_argument("--name", default="shell")
    sp.set_defaults(func=cmd_show_command)

    sp = sub.add_parser("probe-accel", help="print the (cached) KVM probe verdict")
    common(sp, accel=False)
    sp.add_argument("--refresh", action="store_true", help="probe again, ignoring the cache")
    sp.set_defaults(func=cmd_probe_accel)

    sp = sub.add_parser("cache-key", help="print the rootfs (or image) cache key, for CI caches")
    common(sp, accel=False)
    sp.add_argument("--what", choices=("rootfs", "image"), default="rootfs")
    sp.set_defaults(func=cmd_cache_key)

    sp = sub.add_parser("bench", help="measure boot/reset/latency, merge into a JSON file")
    common(sp)
    sp.add_argument("--out", default="bench/results.json")
    sp.add_argument("--runs", type=int, default=3, help="boots per cold/golden measurement")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("survey", help="boot a guest, run `ckpt survey` in it, keep reports/survey-ARCH-KERNEL.{json,html}")
    common(sp)
    sp.add_argument("--out", default="reports")
    sp.add_argument("--engine-dir", default=None)
    sp.add_argument("--settle", type=float, default=2.0, help="seconds to let the guest's services start first")
    sp.set_defaults(func=cmd_survey)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        if hasattr(args, "distro"):
            args.kernel = args.kernel or DEFAULT_KERNELS.get(args.distro, "")
            kernel_suite(args.kernel, args.distro)  # VmError(kind="usage") before any work
        return int(args.func(args))
    except VmError as exc:
        print(f"vm: error: {exc}", file=sys.stderr)
        return 2 if exc.kind in USAGE_KINDS else 1
    except KeyboardInterrupt:
        print("vm: interrupted", file=sys.stderr)
        return 130
