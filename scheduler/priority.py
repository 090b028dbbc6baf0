"""A tenant's placement priority: the default its requests get and the range
an `x-priority` header may choose from. Higher is served first when every
replica is saturated; negative is sheddable (refused first, never queued).

A header outside the range is clamped into it rather than refused: an
operator may narrow a tenant's range at any time, and a client that hard-codes
a priority should then be served at the nearest allowed one, not start failing.
A header that is not an integer is a 400.
"""

from __future__ import annotations

import msgspec

from scheduler.errors import InvalidRequest

PRIORITY_HEADER = "x-priority"


class PriorityRange(msgspec.Struct, frozen=True, kw_only=True):
    # Default: normal work at 0; a tenant may mark its own work sheddable (-1)
    # but only an operator can grant anything above 0.
    default: int = 0
    lowest: int = -1
    highest: int = 0

    def __post_init__(self) -> None:
        if not self.lowest <= self.default <= self.highest:
            raise ValueError(f"priority default {self.default} outside "
                             f"[{self.lowest}, {self.highest}]")

    def resolve(self, asked: str | None) -> int:
        """The priority of a request that asked for `asked` (the header's value)."""
        if asked is None or not asked.strip():
            return self.default
        try:
            value = int(asked.strip())
        except ValueError:
            raise InvalidRequest(f"`{PRIORITY_HEADER}` must be an integer.",
                                 param=PRIORITY_HEADER) from None
        return min(self.highest, max(self.lowest, value))


DEFAULT_PRIORITY = PriorityRange()
