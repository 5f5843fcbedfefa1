"""`ckpt`: the command line. Modelled on criu's so its users feel at home.

Exit codes (DESIGN.md): 0 done, 2 usage, 3 refused, 4 failed. Refusals go to
stderr one per line; a traceback is shown only with --debug.
"""

from __future__ import annotations

import os
import sys
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional

from . import __version__, fastjson
from .context import DEFAULT_GHOST_LIMIT, VALIDATION_MODES, Options
from .errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, EngineError, Refusal, Refusals, UsageError


def parse_size(text: str) -> int:
    """'65536', '64k', '64M', '1GiB' -> bytes (binary multiples)."""
    import re       # here: only a --ghost-limit needs it (re costs every run ~20 ms under TCG)
    m = re.match(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", text, re.I)
    if not m:
        import argparse
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64M, 1G)")
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))


def _pid(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid <= 0:
        import argparse
        raise argparse.ArgumentTypeError(f"not a PID: {text!r}")
    return pid


def _parser_class():
    import argparse      # here, not at the top: engine/fastargs.py parses the common lines

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str):   # argparse's own usage errors: exit 2, one line
            self.print_usage(sys.stderr)
            sys.stderr.write(f"ckpt: error: {message}\n")
            sys.exit(EXIT_USAGE)
    return _Parser


COMMANDS = ("dump", "restore", "check", "survey", "show")


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that command's subparser (a run parses
    one command: building all five costs every run ~5 ms)."""
    import argparse
    _Parser = _parser_class()
    p = _Parser(prog="ckpt", description="Checkpoint and restore a Linux process: exactly, or not at all.")
    p.add_argument("--version", action="version", version=f"ckpt {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one machine-readable JSON object on stdout")
    common.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    files = argparse.ArgumentParser(add_help=False)
    files.add_argument("--file-validation", choices=VALIDATION_MODES, default="digest",
                       help="how a reopened file is shown to be the same file (default: digest)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    if only in (None, "dump"):
        d = sub.add_parser("dump", parents=[common, files], help="checkpoint a process into an image directory")
        d.add_argument("-t", "--tree", dest="pid", type=_pid, required=True, metavar="PID")
        d.add_argument("-D", "--images-dir", dest="dir", required=True, metavar="DIR", help="must not exist yet")
        d.add_argument("--leave-running", action="store_true", help="let the process go on after the dump")
        d.add_argument("--shell-job", action="store_true",
                       help="save a process on a terminal whose master is outside the dump (restore with --tty)")
        d.add_argument("--ghost-limit", type=parse_size, default=DEFAULT_GHOST_LIMIT, metavar="SIZE",
                       help=f"largest deleted-but-open file kept in the image (default {DEFAULT_GHOST_LIMIT >> 20}M)")

    if only in (None, "restore"):
        r = sub.add_parser("restore", parents=[common, files], help="restore a process from an image directory")
        r.add_argument("-D", "--images-dir", dest="dir", required=True, metavar="DIR")
        r.add_argument("--pidfile", metavar="FILE", help="write the restored PID here")
        r.add_argument("--tty", metavar="PATH", default="",
                       help="the terminal to reopen a --shell-job process's terminal fds on ('inherit': ckpt's stdin)")

    if only in (None, "check"):
        c = sub.add_parser("check", parents=[common, files],
                           help="dry run: every fd and piece of state with its verdict; writes nothing")
        c.add_argument("-t", "--tree", dest="pid", type=_pid, required=True, metavar="PID")
        c.add_argument("--shell-job", action="store_true", help="as for dump")
        c.add_argument("--ghost-limit", type=parse_size, default=DEFAULT_GHOST_LIMIT, metavar="SIZE")

    if only in (None, "survey"):
        v = sub.add_parser("survey", parents=[common, files],
                           help="the check verdict of every process on the machine, and what stops the refused ones")
        v.add_argument("--pid", type=_pid, action="append", metavar="PID",
                       help="only the tree under PID (PID and its descendants); may be repeated")
        v.add_argument("--comm", metavar="NAME", help="only processes whose comm is NAME (or matches the pattern)")
        v.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with the histogram")
        v.add_argument("--timeout", type=float, default=20.0, metavar="SECONDS",
                       help="give up the check of one process after this long (default 20)")
        v.add_argument("--processes", action="store_true", help="also list every process with its verdict")
        v.add_argument("--ghost-limit", type=parse_size, default=DEFAULT_GHOST_LIMIT, metavar="SIZE")

    if only in (None, "show"):
        s = sub.add_parser("show", parents=[common], help="a readable view of an image")
        s.add_argument("-D", "--images-dir", dest="dir", required=True, metavar="DIR")
    return p


def _options(args) -> Options:
    return Options(leave_running=getattr(args, "leave_running", False),
                   ghost_limit=getattr(args, "ghost_limit", DEFAULT_GHOST_LIMIT),
                   file_validation=getattr(args, "file_validation", "digest"),
                   debug=args.debug, shell_job=getattr(args, "shell_job", False),
                   tty=getattr(args, "tty", "") or "")


# The worker imports engine/dump.py and what it needs, not ckpt's own
# process: ckpt only waits for its report, and a worker forked from a
# process that had imported them all would copy, page by page, much of the
# memory those imports made as it touched it (~240 page faults of a small
# process's dump on the host). (A dump sha256's only small files since the
# pages carry CRCs: OpenSSL's sha256 is not loaded, engine/sha256.py.)
def dump(*args):
    from .dump import dump
    return dump(*args)


def check(*args):
    from .dump import check
    return check(*args)


def _run(args) -> dict:
    opts = _options(args)
    if args.command == "dump":
        from . import guard
        return guard.run(dump, args.pid, args.dir, opts)   # the tracer is a worker ckpt guards
    if args.command == "check":
        from . import guard
        return guard.run(check, args.pid, opts)   # killed mid-freeze, it must not leave the target masked
    if args.command == "survey":
        from .survey import run_cli
        return run_cli(args, opts)
    if args.command == "restore":
        from .restore import restore
        if os.environ.get("CKPT_PROFILE"):    # (engine/profiling.py imported only then)
            from .profiling import run as profiled
            return profiled("restore-checks", restore, args.dir, opts, args.pidfile)
        return restore(args.dir, opts, args.pidfile)
    from .show import show
    return show(args.dir)


def _human(command: str, res: dict) -> str:
    if command == "dump":
        mib = res.get("pages_bytes", 0) / (1 << 20)
        fate = "left running" if res.get("left_running") else "killed"
        nthreads = res.get("threads", 1)
        who = f"pid {res.get('pid')}" + (f" ({nthreads} threads)" if nthreads > 1 else "")
        if res.get("members"):
            who = (f"the tree of pid {res.get('pid')} ({res['members']} processes, {res.get('zombies', 0)} "
                   f"zombies, {nthreads} threads)")
        return (f"ckpt: dumped {who} to {res.get('image')}: {mib:.1f} MiB of memory, "
                f"{res.get('mappings', '?')} mappings, {res.get('fds', '?')} fds; frozen "
                f"{res.get('frozen_ms', 0):.0f} ms, durable after {res.get('durable_ms', res.get('total_ms', 0)):.0f} ms, "
                f"total {res.get('total_ms', 0):.0f} ms; process {fate}"
                # handlers set up at the freeze (engine/task.py settle), run after
                + (f"; {res['signals_taken']} pending signal(s) taken at the freeze"
                   if res.get("signals_taken") else ""))
    if command == "restore":
        tree = f" and its tree ({res['members']} processes)" if res.get("members") else ""
        shared = (f"; {res['cow_shared_bytes'] / (1 << 20):.1f} MiB of members' memory kept shared with their parents"
                  if res.get("cow_shared_bytes") else "")
        return f"ckpt: restored pid {res.get('pid')}{tree} in {res.get('restore_ms', 0):.0f} ms{shared}"
    if command == "check":
        from .show import render_check
        return render_check(res)
    if command == "survey":
        from .survey import render_table
        return render_table(res, list_processes=res.get("_list_processes", False))
    from .show import render
    return render(res)


#: New container objects between the cyclic collector's young passes.
YOUNG = 100_000


def quiet_collector() -> None:
    """A ckpt run holds ~7k objects and frees its garbage by reference
    counting; at the default threshold (700) the cyclic collector still
    runs ~8 young-generation passes a run: ~2 ms on the host, ~25 ms under
    TCG (issue 15). It stays on, for cycles, past YOUNG new objects. Not
    fewer: a 50-process tree's dump and restore each made one pass at
    20,000, ~2.3 ms of CPU each (a pass costs ~0.1 us for every young
    object, and a tree's records live to the end), which found 14 to 41
    objects in cycles."""
    import gc
    gc.set_threshold(YOUNG, 10, 10)


def leave(code) -> None:
    """Exit with `code` once the command is over, without the interpreter's
    finalization: tearing down ~100 modules and collecting them is ~3.5 ms
    of every run on a host (more under TCG), and the engine has nothing
    left to finalize (no exit handlers, every image file closed and
    fsync'd by then). What finalization would still do is done here: wait
    for non-daemon threads, flush stdout and stderr (a failing flush exits
    120, as python3 does)."""
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    import atexit
    if atexit._ncallbacks():
        sys.exit(code)          # someone registered one: the interpreter's own way
    if not isinstance(code, int):
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:       # noqa: BLE001 - as the interpreter: exit 120
            code = 120
    os._exit(code & 0xFF)


def main(argv: Optional[List[str]] = None) -> int:
    quiet_collector()
    if argv is None:
        argv = sys.argv[1:]
    if argv == ["--version"]:      # what argparse's version action prints, without importing it
        print(f"ckpt {__version__}")
        return EXIT_OK
    import _signal
    # SIGCHLD ignored by whoever started ckpt (inherited across exec): the
    # kernel would reap its children itself and every wait fail (ECHILD:
    # a dump ended in an internal error)
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    from .fastargs import parse
    args = parse(argv) or build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    try:
        res = _run(args)
    except (Refusal, Refusals) as e:
        refusals = e.refusals if isinstance(e, Refusals) else [e]
        for r in refusals:
            sys.stderr.write(f"ckpt: refused: {r.message}\n")
        if args.json:
            print(fastjson.dumps({"ok": False, "exit": e.exit_code, "error": "refused", "command": args.command,
                                  "refusals": [r.as_dict() for r in refusals]}))
        return e.exit_code
    except EngineError as e:
        if args.debug:
            import traceback     # only here: its import costs every run ~2 ms
            traceback.print_exc()
        kind = "error" if isinstance(e, UsageError) else "failed"
        sys.stderr.write(f"ckpt: {kind}: {e.message}\n")
        if args.json:
            print(fastjson.dumps({"ok": False, "exit": e.exit_code, "error": "usage" if kind == "error" else "failed",
                                  "command": args.command, "message": e.message, "errno": e.errno}))
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("ckpt: failed: interrupted\n")
        return EXIT_FAILED
    except Exception as e:  # a bug: still one clear line, traceback on --debug
        if args.debug:
            import traceback     # only here: its import costs every run ~2 ms
            traceback.print_exc()
        sys.stderr.write(f"ckpt: failed: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)\n")
        if args.json:
            print(fastjson.dumps({"ok": False, "exit": EXIT_FAILED, "error": "failed", "command": args.command,
                                  "message": f"internal error: {type(e).__name__}: {e}"}))
        return EXIT_FAILED
    if args.json:
        print(fastjson.dumps({"ok": True, "command": args.command, "result": res}, default=str))
    else:
        print(_human(args.command, res))
    if args.command == "check" and not res.get("ok", True):
        return 3
    if args.command == "restore" and res.get("foreground"):
        # a shell job that was in the foreground: ckpt stays its parent until
        # its group is gone (engine/fds/tty.py). The result is out first: a
        # caller that is not a shell learns the pid without waiting. ckpt's
        # exit status is then the job's, as sudo's is its command's.
        from .fds.tty import wait_foreground
        sys.stdout.flush()
        return wait_foreground(res["foreground"]["pgid"], res["foreground"]["tty"], int(res.get("pid") or 0))
    return EXIT_OK
