"""`ckpt dump | check | restore` command lines parsed without argparse.

Why: argparse's first parse imports gettext, locale and shutil (which
imports bz2, lzma and zlib) and looks for message catalogues - ~5 ms of
every ckpt run, a tenth of a small process's dump. The plain forms that
scripts, the harness and the wrappers use are parsed here into the same
attributes argparse would give. Anything else - help, --version, an
abbreviation, `-tPID`, a value starting with "-", a bad value, a repeated
or missing option, "--", a stray word - returns None, and argparse
parses the command line with its own messages and exit codes.
tests/test_cli_fastargs.py holds the two to the same answers.
"""

from __future__ import annotations

import sys

from .context import DEFAULT_GHOST_LIMIT, VALIDATION_MODES

SimpleNamespace = type(sys.implementation)     # what types.SimpleNamespace is, without importing types


def _choice(text: str) -> str:
    if text not in VALIDATION_MODES:
        raise ValueError(text)
    return text


def _pid(text: str) -> int:
    from .cli import _pid
    return _pid(text)


def _size(text: str) -> int:
    from .cli import parse_size
    return parse_size(text)


# command: ({option spelling: (dest, converter or None for a flag)}, required dests, defaults)
_COMMON = {"--json": ("json", None), "--debug": ("debug", None), "--file-validation": ("file_validation", _choice)}
_TREE = {"-t": ("pid", _pid), "--tree": ("pid", _pid)}
_DIR = {"-D": ("dir", str), "--images-dir": ("dir", str)}
_COMMON_DEFAULTS = {"json": False, "debug": False, "file_validation": "digest"}

SPECS = {
    "dump": ({**_COMMON, **_TREE, **_DIR, "--leave-running": ("leave_running", None),
              "--shell-job": ("shell_job", None), "--ghost-limit": ("ghost_limit", _size)},
             ("pid", "dir"),
             {**_COMMON_DEFAULTS, "leave_running": False, "shell_job": False, "ghost_limit": DEFAULT_GHOST_LIMIT}),
    "check": ({**_COMMON, **_TREE, "--shell-job": ("shell_job", None), "--ghost-limit": ("ghost_limit", _size)},
              ("pid",),
              {**_COMMON_DEFAULTS, "shell_job": False, "ghost_limit": DEFAULT_GHOST_LIMIT}),
    "restore": ({**_COMMON, **_DIR, "--pidfile": ("pidfile", str), "--tty": ("tty", str)},
                ("dir",),
                {**_COMMON_DEFAULTS, "pidfile": None, "tty": ""}),
}


def parse(argv) -> SimpleNamespace | None:
    """The parsed command line, or None when argparse must parse it."""
    if not argv or argv[0] not in SPECS:
        return None
    options, required, defaults = SPECS[argv[0]]
    got: dict = {}
    i = 1
    while i < len(argv):
        word = argv[i]
        name, eq, value = word.partition("=") if word.startswith("--") else (word, "", "")
        if name not in options:
            return None
        dest, convert = options[name]
        if dest in got:
            return None          # repeated (or two spellings of one option): argparse's rules
        if convert is None:
            if eq:
                return None      # --json=1: argparse's error
            got[dest] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                return None
            value = argv[i + 1]
            i += 1
        if value.startswith("-"):
            return None          # argparse decides whether that is a value or an option
        try:
            got[dest] = convert(value)
        except Exception:  # noqa: BLE001 - argparse reports the bad value
            return None
        i += 1
    if any(d not in got for d in required):
        return None
    return SimpleNamespace(command=argv[0], **{**defaults, **got})
