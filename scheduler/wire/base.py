"""The base of the tagged messages: `kind` names each message's type."""

from __future__ import annotations

import msgspec


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    pass
