"""Plain records for the guest's modules: a dataclass's ``==`` and ``repr``
without :mod:`dataclasses`.

Runs in the guest (stdlib only, Python >= 3.9). The exec'd workload imports
seeded, world and kinds.core at every start; with dataclasses they imported
inspect, ast, dis and tokenize, and each ``@dataclass`` generated its methods
with exec: ~6 ms on the host, about ten times that under TCG, per scenario.
A subclass names its fields in ``FIELDS`` and writes its own ``__init__``.
"""

from __future__ import annotations

TYPE_CHECKING = False   # annotations only: typing is ~2 ms of imports
if TYPE_CHECKING:
    from typing import Tuple


class Record:
    FIELDS: Tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.FIELDS)

    __hash__ = None     # type: ignore[assignment] - mutable, unhashable, as a dataclass with eq

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self.FIELDS)})"
