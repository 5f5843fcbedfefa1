"""A stand-in for ``dataclasses.dataclass`` (init, repr, eq) for the engine's
few record classes. Why: importing dataclasses imports inspect, ast, dis and
tokenize (~6 ms), and the decorator itself calls inspect.signature - a
noticeable part of a small process's ~30 ms dump budget, paid by every
ckpt run. Fields are the class's annotations in order; a class attribute
is the default; ``field(default_factory=f)`` a fresh default per instance.
"""

from __future__ import annotations


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make


def field(*, default_factory):
    return _Factory(default_factory)


_MISSING = object()


def dataclass(cls):
    names = []
    for klass in reversed(cls.__mro__):
        for n in klass.__dict__.get("__annotations__", {}):
            if n not in names:
                names.append(n)
    defaults = {}
    for klass in reversed(cls.__mro__):
        for n in names:
            if n in klass.__dict__:
                defaults[n] = klass.__dict__[n]
    for n, d in defaults.items():
        if isinstance(d, _Factory) and n in cls.__dict__:
            delattr(cls, n)
    names = tuple(names)

    def __init__(self, *args, **kw):
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__}() takes {len(names)} positional arguments, {len(args)} given")
        for n, v in zip(names, args):
            setattr(self, n, v)
        for n in names[len(args):]:
            v = kw.pop(n, _MISSING)
            if v is _MISSING:
                d = defaults.get(n, _MISSING)
                if d is _MISSING:
                    raise TypeError(f"{cls.__name__}() missing argument {n!r}")
                v = d.make() if isinstance(d, _Factory) else d
            setattr(self, n, v)
        if kw:
            raise TypeError(f"{cls.__name__}() got unexpected arguments {sorted(kw)}")
        post = getattr(self, "__post_init__", None)
        if post is not None:
            post()

    def __repr__(self):
        return f"{cls.__qualname__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in names)

    cls.__init__ = __init__
    cls.__repr__ = __repr__
    cls.__eq__ = __eq__
    cls.__hash__ = None         # as dataclass(eq=True): mutable records are unhashable
    cls.__dataclass_names__ = names
    return cls


def replace(obj, **changes):
    """A copy of `obj` with `changes` (as dataclasses.replace)."""
    names = obj.__class__.__dataclass_names__
    unknown = set(changes) - set(names)
    if unknown:
        raise TypeError(f"{obj.__class__.__name__} has no fields {sorted(unknown)}")
    return obj.__class__(**{n: changes.get(n, getattr(obj, n)) for n in names})
