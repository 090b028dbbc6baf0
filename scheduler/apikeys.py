"""API keys: `sy-<key id>-<secret><checksum>`.

The secret carries 256 bits; the checksum (CRC-32) lets a mistyped key be
rejected without touching the store; only an HMAC of key id and secret,
keyed with a server secret, is ever stored, and compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import zlib
from dataclasses import dataclass

from scheduler.errors import AuthenticationFailed

PREFIX = "sy"
KEY_ID_CHARS = 12
SECRET_BYTES = 32
SECRET_CHARS = 52  # base32 of 32 bytes, unpadded
CHECKSUM_CHARS = 6
HINT_CHARS = 4


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").lower()


def _checksum(body: str) -> str:
    return _b32(zlib.crc32(body.encode()).to_bytes(4, "big"))[:CHECKSUM_CHARS]


@dataclass(frozen=True)
class ParsedKey:
    key_id: str
    secret: str


@dataclass(frozen=True)
class IssuedKey:
    plaintext: str
    key_id: str
    digest: str
    hint: str


def digest(server_secret: bytes, key_id: str, secret: str) -> str:
    return hmac.new(server_secret, f"{key_id}:{secret}".encode(), hashlib.sha256).hexdigest()


def issue(server_secret: bytes) -> IssuedKey:
    key_id = _b32(secrets.token_bytes(10))[:KEY_ID_CHARS]
    secret = _b32(secrets.token_bytes(SECRET_BYTES))
    body = f"{PREFIX}-{key_id}-{secret}"
    plaintext = body + _checksum(body)
    return IssuedKey(plaintext, key_id, digest(server_secret, key_id, secret),
                     plaintext[-HINT_CHARS:])


def parse(plaintext: str) -> ParsedKey:
    """Checks shape and checksum; raises AuthenticationFailed without saying which."""
    parts = plaintext.split("-")
    expected_len = len(PREFIX) + 2 + KEY_ID_CHARS + SECRET_CHARS + CHECKSUM_CHARS
    if len(parts) != 3 or parts[0] != PREFIX or len(plaintext) != expected_len:
        raise AuthenticationFailed("Incorrect API key provided.")
    body, check = plaintext[:-CHECKSUM_CHARS], plaintext[-CHECKSUM_CHARS:]
    if not hmac.compare_digest(_checksum(body), check):
        raise AuthenticationFailed("Incorrect API key provided.")
    return ParsedKey(key_id=parts[1], secret=parts[2][:-CHECKSUM_CHARS])


def matches(server_secret: bytes, key: ParsedKey, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(server_secret, key.key_id, key.secret), stored_digest)
