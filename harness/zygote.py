"""A warm ``ckpt``: the resident agent (harness/agent.py) imports the engine
once, before the golden snapshot, and runs each ``ckpt`` command in a fork
of itself that starts exactly where an exec'd ``ckpt`` would be once its
interpreter had started - the same argv, environment, cwd, fds, signal
dispositions and mask, umask, rlimits, session, sys.path, std streams,
``__main__``, exit status and output - but without the ~0.5-2.7 s (TCG,
idle to loaded) of python3 start-up and engine imports each time.

Runs in the guest (stdlib only). Honest by construction, or not at all:

* Only the ``ckpt`` wrapper this module knows how to mirror is warmed
  (:data:`WRAPPER`, checked byte for byte against the file on PATH at
  start), and only when the agent's python3 runs with the very options the
  wrapper gives its python3 (``-S`` in the guests: the agent is started
  so, harness/agent_client.py start_line); anything else turns warmth
  off, it does not guess.
* Module state is fresh: the zygote only *imports* the engine, never runs
  it, and every command is a new fork of that pristine process (nothing a
  command does can reach the next). Import-time state that depends on the
  environment (engine/faults.py reads CKPT_FAULT*) was computed under the
  wrapper's environment; a command whose environment differs in any way
  is exec'd instead (:meth:`Zygote.why_cold`). No file in a command's
  cwd can shadow a module: the wrapper's code puts the engine's root in
  the cwd's place on sys.path before it imports anything.
* What the fork does not re-create is said here: the process's memory
  layout is the agent's (one ASLR draw per golden snapshot instead of one
  per command) and its /proc/self/cmdline is the agent's. ``CRUCIBLE_WARM_CKPT=0``
  on the host execs every ``ckpt`` as before (tests/test_harness_zygote.py
  runs the same commands both ways and compares).

criu, the mutants and everything else are exec'd or forked as before.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import re
import os
import shutil
import signal
import sys
import types
import warnings
from typing import Dict, List, Optional, Sequence

try:    # (they are the warm workload's too: harness/warmfork.py)
    from .warmfork import exec_signals as _exec_signals, interpreter_flags, std_streams as _std_streams
except ImportError:  # pragma: no cover - in the guest, run as a script
    from warmfork import exec_signals as _exec_signals, interpreter_flags, std_streams as _std_streams  # type: ignore

#: The guest's /usr/local/bin/ckpt (vm/recipe.py CKPT_WRAPPER_FAST, with
#: CODE's ROOT the engine's parent directory and FLAGS python3's options):
#: what :meth:`Zygote.child` mirrors. (The image's own CKPT_WRAPPER, the
#: older `-m engine` form replaced at every launch, is not mirrored.)
WRAPPER = """#!/bin/sh
exec python3 FLAGS-c 'CODE' "$@"
"""
#: What the wrapper's python3 runs: the engine's root first on sys.path in
#: place of the cwd (which ``-c``, like ``-m``, puts there: a root tool must
#: not import a ``ctypes.py`` from wherever it is run), then the engine's
#: __main__ as ``-m engine`` runs it but without runpy, whose imports
#: (importlib.util, contextlib...) cost every run ~5 ms on a host, ~50 ms
#: under TCG.
CODE = 'import sys; sys.path[0] = "ROOT"; import engine.__main__'
MODULE = "engine"
#: What the engine imports for dump, restore and check (the rest on demand;
#: a module imported here and not by a given command changes nothing: the
#: engine's registries are static tables, tests/test_harness_zygote.py).
PRELOAD = ("engine.cli", "engine.guard", "engine.dump", "engine.restore", "engine.show")


def _within(name: str) -> bool:
    """A submodule in its imported parent package's own directories: not one
    another finder maps elsewhere (an editable install of this repo maps
    every `engine.*` to the checkout, whatever `engine` was imported)."""
    import importlib.machinery
    parent = sys.modules.get(name.rpartition(".")[0])
    path = getattr(parent, "__path__", None)
    return bool(path) and importlib.machinery.PathFinder.find_spec(name, list(path)) is not None

# Objects that own the std fds of the zygote: kept alive in the child so
# that no finalizer closes the fd its replacement now uses.
_KEEP: List[object] = []


def code_text(root: str) -> str:
    return CODE.replace("ROOT", root)


def command_line(python: str, root: str) -> str:
    """The wrapper's command as one shell-quoted line (an engine at `root`
    run as the guests' wrapper runs it: bench/compare.py's --ckpt)."""
    import shlex
    return f"{shlex.quote(python)} -S -c {shlex.quote(code_text(root))}"


def wrapper_text(root: str, flags: Sequence[str] = ()) -> str:
    return WRAPPER.replace("CODE", code_text(root)).replace("FLAGS", "".join(f + " " for f in flags))


def wrapper_flags(text: str, root: str) -> Optional[List[str]]:
    """The python3 options of a wrapper of :data:`WRAPPER`'s form (None: not one)."""
    tail = f" -c '{code_text(root)}' \"$@\""
    for line in text.splitlines():
        if line.startswith("exec python3 ") and line.endswith(tail):
            flags = line[len("exec python3 "):-len(tail)].split()
            if all(re.fullmatch(r"-[A-Za-z]+", f) for f in flags) and wrapper_text(root, flags) == text:
                return flags
    if wrapper_text(root) == text:
        return []
    return None


def wrapper_env(env: Dict[str, str], root: str, cwd: Optional[str] = None) -> Dict[str, str]:
    """The environment the wrapper hands python3: the PWD its /bin/sh
    (dash) exports - the inherited one when it names the cwd, else the
    cwd's real path. ``cwd`` None: no PWD (for comparisons)."""
    out = dict(env)
    out.pop("PWD", None)
    if cwd is not None:
        out["PWD"] = _sh_pwd(env.get("PWD", ""), cwd)
    return out


def _sh_pwd(inherited: str, cwd: str) -> str:
    if inherited.startswith("/"):
        try:
            a, b = os.stat(inherited), os.stat(cwd)
            if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                return inherited
        except OSError:
            pass
    return os.path.realpath(cwd)


class Zygote:
    """The warm engine in the agent. :attr:`note` says why it is off ("" = on)."""

    def __init__(self, command: str = "ckpt", root: Optional[str] = None):
        self.command = command
        self.root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.path = ""                   # the wrapper on PATH
        self.note = "not loaded"
        self.env: Dict[str, str] = {}    # the environment the engine was imported under
        self.path_tail: List[str] = []   # sys.path after its first entry, as the wrapper's python3 has it
        self.filters: list = []
        self.unbuffered = False
        self.flags: List[str] = []        # python3's options in the wrapper (and the agent's)

    def load(self, base_path: Sequence[str]) -> str:
        """Check the wrapper and import the engine; ``base_path``: the
        interpreter's own sys.path entries (no script dir, no PYTHONPATH).
        Returns :attr:`note`."""
        self.path = shutil.which(self.command) or ""
        if not self.path:
            self.note = f"no {self.command} on PATH"
            return self.note
        try:
            with open(self.path) as f:
                text = f.read()
        except OSError as e:
            self.note = f"cannot read {self.path}: {e}"
            return self.note
        flags = wrapper_flags(text, self.root)
        if flags is None:
            self.note = f"{self.path} is not the wrapper the zygote mirrors (harness/zygote.py WRAPPER)"
            return self.note
        # the rest of the interpreter's configuration comes from the environment (compared per command)
        own = interpreter_flags()
        if own != flags:
            self.note = (f"the agent's python3 runs with options {own} and the wrapper's with {flags} "
                         "(start the agent as the wrapper starts python3)")
            return self.note
        self.flags = flags
        # PWD is left out of the comparison (the wrapper's shell sets it from
        # each command's cwd; the engine reads none at import: a test greps)
        self.env = wrapper_env(dict(os.environ), self.root)
        pythonpath = self.env.get("PYTHONPATH", "")
        self.path_tail = (pythonpath.split(":") if pythonpath else []) + list(base_path)
        self.filters = list(warnings.filters)
        # PYTHONUNBUFFERED (the same in the command's environment, checked)
        self.unbuffered = bool(getattr(sys.__stdout__, "write_through", False))
        saved_env, saved_path = dict(os.environ), list(sys.path)
        callbacks = atexit._ncallbacks()
        os.environ.clear()
        os.environ.update(wrapper_env(saved_env, self.root, os.getcwd()))
        sys.path[:] = [self.root] + self.path_tail
        try:
            importlib.import_module(MODULE)
            names = list(PRELOAD)
            if _within(MODULE + ".fds"):
                fds = importlib.import_module(MODULE + ".fds")
                names += [f"{MODULE}.fds.{m}" for m in sorted({m for m in getattr(fds, "KINDS", {}).values() if m})]
            for name in names:
                if _within(name):    # (the tests' probe has none)
                    importlib.import_module(name)
        except Exception as e:
            self.note = f"the engine did not import: {type(e).__name__}: {e}"
            return self.note
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            sys.path[:] = saved_path
        if atexit._ncallbacks() != callbacks:
            self.note = "the engine registers exit handlers at import (a fork would run the agent's too)"
            return self.note
        self.note = ""
        return self.note

    @property
    def ready(self) -> bool:
        return not self.note

    def wants(self, argv: Sequence[str]) -> bool:
        """Is this a command the zygote is for (the wrapper, by name or path)?"""
        return bool(argv) and argv[0] in (self.command, self.path) and bool(self.path)

    def why_cold(self, env: Dict[str, str], cwd: str) -> str:
        """Why this command must be exec'd ("" = the fork is exact)."""
        if self.note:
            return self.note
        if wrapper_env(env, self.root) != self.env:
            diff = sorted(k for k in set(env) | set(self.env) if wrapper_env(env, self.root).get(k) != self.env.get(k))
            return "its environment differs from the one the engine was imported under: " + ", ".join(diff[:5])
        return ""

    # -- in the forked child ---------------------------------------------------------
    def child(self, argv: Sequence[str], env: Dict[str, str]) -> None:  # pragma: no cover - the child; never returns
        """Become ``python3 -c CODE argv[1:]`` as the wrapper would have
        exec'd it (fds 0-2 and the cwd are already the command's), run it,
        and exit as that interpreter would. ``env``: the command's (as given
        to the wrapper)."""
        code = 1
        interrupted = False
        try:
            os.environ.clear()
            os.environ.update(wrapper_env(env, self.root, "."))
            sys.path[:] = [""] + self.path_tail        # as -c starts (CODE puts the root in its place)
            sys.argv = ["-c"] + list(argv[1:])
            source = code_text(self.root)
            if hasattr(sys, "orig_argv"):
                sys.orig_argv = ["python3", *self.flags, "-c", source] + list(argv[1:])
            _exec_signals()
            _std_streams(self.unbuffered)
            atexit._clear()          # the agent's; the engine registered none (checked at load)
            warnings.filters[:] = self.filters
            sys.excepthook, sys.displayhook = sys.__excepthook__, sys.__displayhook__
            sys.unraisablehook = sys.__unraisablehook__
            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = sys.modules["builtins"]
            sys.modules["__main__"] = main
            try:
                exec(compile(source, "<string>", "exec"), main.__dict__)    # what `python3 -c` does
                code = 0
            except SystemExit as e:
                code = _system_exit_code(e)
            except BaseException as e:   # noqa: BLE001 - the interpreter's own top level
                interrupted = isinstance(e, KeyboardInterrupt)
                # from the <string> frame on, as python3 -c prints it (not this one)
                tb = e.__traceback__.tb_next if e.__traceback__ else None
                sys.excepthook(type(e), e.with_traceback(tb), tb)
                code = 1
            # Py_FinalizeEx's order: wait for threads, exit handlers, flush
            if "threading" in sys.modules:
                sys.modules["threading"]._shutdown()
            atexit._run_exitfuncs()
            for name in ("stdout", "stderr"):
                stream = getattr(sys, name, None)
                try:
                    if stream is not None:
                        stream.flush()
                except Exception:   # noqa: BLE001 - as the interpreter: exit 120
                    code = 120
        except BaseException:   # noqa: BLE001 - the zygote itself failed: say so, as a crash
            import traceback
            traceback.print_exc()
            code = 1
        if interrupted:          # python3 dies of the SIGINT it did not handle
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF if isinstance(code, int) else 1)


def _system_exit_code(e: SystemExit) -> int:
    c = e.code
    if c is None:
        return 0
    if isinstance(c, int):
        return c
    try:
        sys.stderr.write(f"{c}\n")
    except Exception:   # noqa: BLE001
        pass
    return 1
