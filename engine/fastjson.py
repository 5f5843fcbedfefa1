"""json.dumps / json.loads, byte for byte, without importing the json package.

`import json` imports re (json.decoder and json.encoder compile regexes at
import), and re imports enum, functools and collections: ~85 ms of every
ckpt run in an x86_64 TCG guest (issue 15), where the engine needs only the
C scanner and encoder json itself uses. This module calls those (`_json`)
the way json does for the calls the engine makes, so the text and the
objects are the same (tests/test_fastjson.py compares them with json's on
many documents): the image format does not change.

Anything else falls back to the json package: input that is not plain
UTF-8 bytes or str, a document json would reject (its exception, with its
message, is the one raised: refusals quote it), an object the fast encoder
does not take. Without `_json` (another Python), everything does.
"""

from __future__ import annotations

try:
    from _json import encode_basestring_ascii as _ascii
    from _json import make_encoder as _c_make_encoder
    from _json import make_scanner as _c_make_scanner
except ImportError:     # pragma: no cover - CPython has it; another Python uses json
    _c_make_encoder = _c_make_scanner = _ascii = None

_WS = " \t\n\r"     # json.decoder.WHITESPACE
_NAN = float("nan")
_INF = float("inf")
_CONSTANTS = {"-Infinity": -_INF, "Infinity": _INF, "NaN": _NAN}    # json.decoder._CONSTANTS


class _Context:
    """What json.decoder.JSONDecoder() hands the C scanner."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan_once = _c_make_scanner(_Context()) if _c_make_scanner else None


def _json():
    import json
    return json


def loads(s):
    """json.loads(s)."""
    if _scan_once is None:
        return _json().loads(s)
    try:
        if isinstance(s, (bytes, bytearray)):
            # json.detect_encoding: UTF-8 unless a BOM or a NUL in the first
            # bytes says otherwise (those go the json way)
            if len(s) < 4 or not s[0] or not s[1] or s[0] in (0xef, 0xfe, 0xff):
                return _json().loads(s)
            s = s.decode("utf-8", "surrogatepass")
        elif not isinstance(s, str) or s.startswith("\ufeff"):
            return _json().loads(s)
        start = len(s) - len(s.lstrip(_WS))
        obj, end = _scan_once(s, start)
        if s[end:].strip(_WS):
            raise ValueError("extra data")
        return obj
    except Exception:
        # json's own verdict and message (a refusal quotes it); the same
        # scanner underneath, so a document it takes gives the same object
        return _json().loads(s)


def _fail(o):
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def dumps(obj, *, sort_keys: bool = False, separators=None, indent=None, default=None) -> str:
    """json.dumps(obj, sort_keys=, separators=, indent=, default=) with
    json's other defaults (ensure_ascii, check_circular, allow_nan)."""
    if _c_make_encoder is None:
        return _json().dumps(obj, sort_keys=sort_keys, separators=separators, indent=indent, default=default)
    try:
        if indent is None:
            if isinstance(obj, str):
                return _ascii(obj)
            item_sep, key_sep = separators if separators is not None else (", ", ": ")
            enc = _c_make_encoder({}, default or _fail, _ascii, None, key_sep, item_sep, sort_keys, False, True)
            return "".join(enc(obj, 0))
        if separators is None and isinstance(indent, int) and default is None:
            # json's own encoder for an indent is pure Python too: this is
            # it for what the engine writes so (str keys, plain values)
            out = []
            _indented(obj, " " * indent, 0, sort_keys, out)
            return "".join(out)
    except Exception:
        pass    # json's own error and message, or its text for what this does not take
    return _json().dumps(obj, sort_keys=sort_keys, separators=separators, indent=indent, default=default)


class _Unsupported(Exception):
    pass


def _indented(o, ind: str, level: int, sort_keys: bool, out: list) -> None:
    """json.encoder._make_iterencode's text for indent=`ind`, separators
    (',', ': '), for str/int/float/bool/None/list/tuple/dict with str keys."""
    if isinstance(o, str):
        out.append(_ascii(o))
    elif o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif isinstance(o, int):
        out.append(int.__repr__(o))
    elif isinstance(o, float):
        if o != o or o in (_INF, -_INF):
            raise _Unsupported
        out.append(float.__repr__(o))
    elif isinstance(o, (list, tuple)):
        if not o:
            out.append("[]")
            return
        if level > 200:
            raise _Unsupported      # json's circular check and recursion error
        nl = "\n" + ind * (level + 1)
        out.append("[" + nl)
        first = True
        for v in o:
            if not first:
                out.append("," + nl)
            first = False
            _indented(v, ind, level + 1, sort_keys, out)
        out.append("\n" + ind * level + "]")
    elif isinstance(o, dict):
        if not o:
            out.append("{}")
            return
        if level > 200:
            raise _Unsupported
        nl = "\n" + ind * (level + 1)
        out.append("{" + nl)
        first = True
        for k, v in (sorted(o.items()) if sort_keys else o.items()):
            if not isinstance(k, str):
                raise _Unsupported
            if not first:
                out.append("," + nl)
            first = False
            out.append(_ascii(k) + ": ")
            _indented(v, ind, level + 1, sort_keys, out)
        out.append("\n" + ind * level + "}")
    else:
        raise _Unsupported
