"""Every fd kind has a handler or an explicit refusal; every reason code a
handler can raise is declared, defined, and documented in the README."""

from __future__ import annotations

import importlib
import inspect
import os
import re

import pytest

from engine.fds import KINDS, handler
from engine.reasons import REASONS

# Raised for any record by the image layer (ImageReader.path, read_json),
# so every handler may surface it without declaring it.
IMPLICIT = {"image-invalid"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RAISED = re.compile(r'(?:refuse|refuse_rec|Refusal)\(\s*(?:info|rec|self|[a-z_]+)?,?\s*(?:ctx,\s*)?"([a-z-]+)"')


def readme_codes():
    """The first column of the README's reason table (its section only: other
    tables, the mutants' one, also start with a code-like name)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("\n## Reason codes\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\|\s*`([a-z][a-z-]*)`\s*\|", section, re.M))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_has_a_module_or_an_explicit_refusal(kind):
    modname = KINDS[kind]
    if modname is None:
        assert handler(kind) is None
        return
    mod = importlib.import_module(f"engine.fds.{modname}")
    assert handler(kind) is mod
    assert mod.KIND == kind
    for fn in ("classify", "dump", "validate", "restore"):
        assert callable(getattr(mod, fn, None)), f"{modname}.{fn}"
    assert mod.REASONS, f"{modname} declares no reason codes"
    for code in mod.REASONS:
        assert code in REASONS, f"{modname} declares undefined reason {code!r}"
    raised = set(_RAISED.findall(inspect.getsource(mod)))
    undeclared = raised - set(mod.REASONS) - IMPLICIT
    assert not undeclared, f"{modname} raises {sorted(undeclared)} without declaring them in REASONS"


def test_shared_helpers_raise_only_declared_codes():
    """Codes raised by the private helpers are declared by their callers."""
    from engine.fds import _pipebuf, _util
    assert set(_RAISED.findall(inspect.getsource(_pipebuf))) <= {"unsupported-fd"}
    users = [importlib.import_module(f"engine.fds.{m}") for m in ("pipe", "fifo")]
    assert all("unsupported-fd" in m.REASONS for m in users)
    helper_codes = set(_RAISED.findall(inspect.getsource(_util)))
    assert helper_codes == {"unsupported-state", "unsupported-fd"}
    # check_async's unsupported-state, check_held_outside's unsupported-fd: each caller declares it
    for name in KINDS:
        if KINDS[name] is None:
            continue
        mod = importlib.import_module(f"engine.fds.{KINDS[name]}")
        src = inspect.getsource(mod)
        if "check_held_outside(" in src:
            assert "unsupported-fd" in mod.REASONS, name
        if "check_async(" in src:
            assert "unsupported-state" in mod.REASONS, name


def test_every_reason_code_is_in_the_readme_table():
    missing = set(REASONS) - readme_codes()
    assert not missing, f"README.md's reason table lacks {sorted(missing)}"
    unknown = readme_codes() & {c for c in readme_codes() if "-" in c} - set(REASONS)
    assert not unknown, f"README.md documents codes that do not exist: {sorted(unknown)}"
