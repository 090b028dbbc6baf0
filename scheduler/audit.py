"""Audit entries of control-plane mutations, chained by hash.

Each entry carries the hash of the entry before it (`prev_hash`) and its own
hash over its content and `prev_hash`, so an entry altered, removed or
inserted anywhere breaks the chain from there on; the store also keeps the
last entry's hash beside the log (the head), which catches a truncated tail.
`before`/`after` are the public views of the record (no digests, no salts),
JSON-encoded; "" when there was none (a creation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgspec

GENESIS_HASH = "0" * 64


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    # The control store's global version this mutation produced.
    version: int
    # Key id of the acting key ("system" for bootstrap operations).
    actor: str
    action: str
    target: str
    before: str
    after: str
    request_id: str
    at_ms: int
    prev_hash: str
    hash: str = ""


class ChainCheck(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    entries: int
    # Index of the first entry that does not verify; -1 when all do.
    first_bad: int = -1
    reason: str = ""


_encode = msgspec.json.Encoder().encode


def entry_hash(entry: AuditEntry) -> str:
    """sha256 over every field but `hash`, in a fixed order."""
    content = msgspec.structs.asdict(entry)
    del content["hash"]
    return hashlib.sha256(_encode(content)).hexdigest()


def sealed(entry: AuditEntry) -> AuditEntry:
    return msgspec.structs.replace(entry, hash=entry_hash(entry))


def to_fields(entry: AuditEntry) -> dict[str, str]:
    return {name: str(value) for name, value in msgspec.structs.asdict(entry).items()}


def from_fields(fields: dict[str, str]) -> AuditEntry:
    values: dict[str, object] = dict(fields)
    for name in ("version", "at_ms"):
        values[name] = int(fields.get(name, "0"))
    return msgspec.convert(values, AuditEntry)


def verify_chain(entries: Iterable[AuditEntry], head_hash: str | None = None) -> ChainCheck:
    """Checks every link, and that the last entry is the recorded head
    (`head_hash`; None skips that check)."""
    prev, count = GENESIS_HASH, 0
    for index, entry in enumerate(entries):
        count += 1
        if entry.prev_hash != prev:
            return ChainCheck(ok=False, entries=count, first_bad=index,
                              reason="does not follow the entry before it")
        if entry_hash(entry) != entry.hash:
            return ChainCheck(ok=False, entries=count, first_bad=index,
                              reason="content does not match its hash")
        prev = entry.hash
    if head_hash is not None and head_hash != prev:
        return ChainCheck(ok=False, entries=count, first_bad=count,
                          reason="the log ends before the recorded head")
    return ChainCheck(ok=True, entries=count)
