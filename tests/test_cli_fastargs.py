"""engine/fastargs.py gives exactly what argparse gives, or hands over.

The fast parser must never answer differently from argparse: for every
command line it either returns the same attributes, or None (argparse
then parses it, errors and help included). The common forms must take
the fast path (else it saves nothing), and every option argparse knows
for the fast commands must be known to it (a new option with a default
would otherwise be missing from the fast answer).
"""

import itertools
import subprocess
import sys

import pytest

from engine import cli, fastargs


def _argparse(argv):
    """vars() of argparse's answer, or ("exit", code) when it exits."""
    try:
        return vars(cli.build_parser(argv[0] if argv and argv[0] in cli.COMMANDS else None).parse_args(argv))
    except SystemExit as e:
        return ("exit", e.code)


def _fast(argv):
    ns = fastargs.parse(argv)
    return None if ns is None else vars(ns)


def _common_forms():
    """Plain command lines as scripts write them: every option, both spellings,
    both `--opt value` and `--opt=value`, in several orders."""
    out = []
    for tree, dirs in itertools.product((["-t", "123"], ["--tree", "123"], ["--tree=123"]),
                                        (["-D", "/x/img"], ["--images-dir", "/x/img"], ["--images-dir=/x/img"])):
        out.append(["dump"] + tree + dirs)
        out.append(["dump"] + dirs + tree + ["--json"])
        out.append(["dump", "--leave-running"] + tree + ["--debug"] + dirs + ["--shell-job"])
        out.append(["check"] + tree)
        out.append(["restore"] + dirs)
    out += [
        ["dump", "-t", "7", "-D", "img", "--ghost-limit", "1G", "--file-validation", "size"],
        ["dump", "-t", "7", "-D", "img", "--ghost-limit=64k", "--file-validation=strict", "--json"],
        ["check", "-t", "7", "--json", "--shell-job", "--ghost-limit", "0", "--file-validation", "none"],
        ["restore", "-D", "img", "--pidfile", "/run/p", "--tty", "inherit", "--json", "--debug"],
        ["restore", "-D", "img", "--pidfile=/run/p", "--tty=/dev/pts/3", "--file-validation", "digest"],
        ["restore", "-D", "", "--tty="],
    ]
    return out


@pytest.mark.parametrize("argv", _common_forms(), ids=" ".join)
def test_common_forms_take_the_fast_path_with_argparses_answer(argv):
    fast = _fast(argv)
    assert fast is not None, "a plain command line left to argparse"
    assert fast == _argparse(argv)


ODD = [
    [], ["--version"], ["-h"], ["dump", "-h"], ["dump", "--help"], ["survey"], ["show", "-D", "x"],
    ["dump"], ["dump", "-t", "1"], ["dump", "-D", "x"], ["check"], ["restore"],
    ["dump", "-t", "0", "-D", "x"], ["dump", "-t", "-5", "-D", "x"], ["dump", "-t", "abc", "-D", "x"],
    ["dump", "-t5", "-D", "x"], ["dump", "-t", "5", "-Dx"], ["dump", "-t", "5", "-D", "-x"],
    ["dump", "--tr", "5", "-D", "x"], ["dump", "--tree", "5", "--images", "x"], ["dump", "-t", "5", "-D", "x", "--js"],
    ["dump", "-t", "5", "-t", "6", "-D", "x"], ["dump", "-t", "5", "--tree", "6", "-D", "x"],
    ["dump", "-t", "5", "-D", "x", "--json", "--json"], ["dump", "-t", "5", "-D", "x", "--json=1"],
    ["dump", "-t", "5", "-D", "x", "extra"], ["dump", "-t", "5", "-D", "x", "--"], ["dump", "--", "-t", "5", "-D", "x"],
    ["dump", "-t", "5", "-D"], ["dump", "-t", "5", "-D", "x", "--ghost-limit", "lots"],
    ["dump", "-t", "5", "-D", "x", "--file-validation", "maybe"], ["dump", "-t", "5", "-D", "x", "--pidfile", "p"],
    ["check", "-t", "5", "-D", "x"], ["check", "-t", "5", "--leave-running"], ["restore", "-D", "x", "-t", "5"],
    ["restore", "-D", "x", "--tty"], ["restore", "-D", "x", "--shell-job"], ["dump", "-t", "5", "-D", "x", "-j"],
    ["--json", "dump", "-t", "5", "-D", "x"], ["dump", "-t", " 5", "-D", "x"], ["dump", "-t", "5", "-D", "x", "--debug=yes"],
]


@pytest.mark.parametrize("argv", ODD, ids=lambda a: " ".join(a) or "(empty)")
def test_anything_else_is_argparses_or_the_same(argv):
    fast = _fast(argv)
    if fast is not None:
        assert fast == _argparse(argv)


def test_every_option_argparse_knows_is_known_here():
    for command in fastargs.SPECS:
        p = cli.build_parser(command)
        sub = next(a for a in p._actions if a.dest == "command").choices[command]
        spellings = {s for a in sub._actions for s in a.option_strings} - {"-h", "--help"}
        assert spellings == set(fastargs.SPECS[command][0]), command
        dests = {a.dest for a in sub._actions if a.dest != "help"}
        assert dests == set(fastargs.SPECS[command][2]) | set(fastargs.SPECS[command][1]), command


def test_version_is_printed_as_argparse_prints_it(capsys):
    fast = subprocess.run([sys.executable, "-S", "-m", "engine", "--version"], capture_output=True, text=True)
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["--version"])
    assert e.value.code == 0 and fast.returncode == 0
    assert (fast.stdout, fast.stderr) == capsys.readouterr()


def test_a_dump_line_imports_no_argparse():
    code = ("import sys; from engine import fastargs; "
            "fastargs.parse(['dump', '-t', '5', '-D', 'x', '--ghost-limit', '1M', '--json']); "
            "print(sorted(m for m in ('argparse', 'gettext', 'shutil', 'typing') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
