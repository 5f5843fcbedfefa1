"""JSON for the exec'd workload's own files (its spec, ready file, request
and verdict) without the :mod:`json` package.

Runs in the guest (stdlib only, Python >= 3.9). ``import json`` imports
``re`` and compiles eight regular expressions at every start, ~3 ms of the
workload's ~16 ms of imports on the host, ten times that under TCG, once
per scenario. The same C scanner parses (``_json.make_scanner``, json's own
fast path) and strings are escaped by json's own C function; the writer is
json.dump's with ``indent=1, default=str`` (its pure-Python path, as json
itself takes with an indent), byte for byte (tests/test_harness_jsonio.py).
Without ``_json`` (an interpreter built without it) everything is json's.
"""

from __future__ import annotations

try:
    import _json
except ImportError:  # pragma: no cover - CPython always has it
    _json = None

TYPE_CHECKING = False   # annotations only
if TYPE_CHECKING:
    from typing import IO, Any, List

_WS = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context:
    """What the C scanner reads off json.JSONDecoder(): its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


try:
    _scan = _json.make_scanner(_Context())
    _string = _json.encode_basestring_ascii     # ensure_ascii=True
except Exception:  # pragma: no cover - no _json, or one that wants more of its context: json's
    _json = _scan = _string = None


def loads(s: str) -> Any:
    """json.loads(s) for a str; a ValueError (json.JSONDecodeError from the
    C scanner, or one of ours) for what json would refuse."""
    if _scan is None:  # pragma: no cover
        import json
        return json.loads(s)
    if s.startswith("\ufeff"):
        raise ValueError("Unexpected UTF-8 BOM (decode using utf-8-sig)")
    n = len(s)
    start = n - len(s.lstrip(_WS))
    try:
        obj, end = _scan(s, start)
    except StopIteration as e:
        raise ValueError(f"Expecting value: char {e.value}") from None
    if len(s[end:].lstrip(_WS)):
        raise ValueError(f"Extra data: char {end}")
    return obj


def load(f: IO[str]) -> Any:
    return loads(f.read())


def _float(o: float) -> str:
    if o != o:
        return "NaN"
    if o == float("inf"):
        return "Infinity"
    if o == -float("inf"):
        return "-Infinity"
    return float.__repr__(o)


def _key(k: Any) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, float):
        return _float(k)
    if k is True:
        return "true"
    if k is False:
        return "false"
    if k is None:
        return "null"
    if isinstance(k, int):
        return int.__repr__(k)
    raise TypeError(f"keys must be str, int, float, bool or None, not {k.__class__.__name__}")


def _encode(o: Any, level: int, out: List[str]) -> None:
    if isinstance(o, str):
        out.append(_string(o))
    elif o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif isinstance(o, int):
        out.append(int.__repr__(o))
    elif isinstance(o, float):
        out.append(_float(o))
    elif isinstance(o, (list, tuple)):
        if not o:
            out.append("[]")
            return
        inner = "\n" + " " * (level + 1)
        out.append("[" + inner)
        for i, v in enumerate(o):
            if i:
                out.append("," + inner)
            _encode(v, level + 1, out)
        out.append("\n" + " " * level + "]")
    elif isinstance(o, dict):
        if not o:
            out.append("{}")
            return
        inner = "\n" + " " * (level + 1)
        out.append("{" + inner)
        for i, (k, v) in enumerate(o.items()):
            if i:
                out.append("," + inner)
            out.append(_string(_key(k)) + ": ")
            _encode(v, level + 1, out)
        out.append("\n" + " " * level + "}")
    else:
        _encode(str(o), level, out)     # default=str


def dumps_indented(obj: Any) -> str:
    """json.dumps(obj, indent=1, default=str)."""
    if _json is None:  # pragma: no cover
        import json
        return json.dumps(obj, indent=1, default=str)
    out: List[str] = []
    _encode(obj, 0, out)
    return "".join(out)


def dump_indented(obj: Any, f: IO[str]) -> None:
    """json.dump(obj, f, indent=1, default=str)."""
    f.write(dumps_indented(obj))

