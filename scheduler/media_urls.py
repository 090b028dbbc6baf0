"""Which URLs in a chat message's content may reach a replica.

vLLM fetches the http(s) URLs of media parts itself (`image_url`, `audio_url`,
`video_url`, and more with each release) and reads `file:` ones when allowed,
so a URL in a message is a connection the replica makes for the client. By
default only `data:` URLs pass; http(s) ones only to hosts the operator put
on the allowlist (`ingress.media_url_hosts`), and never to loopback,
link-local, private or metadata addresses, whatever the allowlist says.

Every string in a content part is checked, not only the fields known today:
vLLM also reads a part without `type` (or with a `uuid`) by the media keys it
has. A string counts as a URL when Python's URL parser (the one vLLM uses)
finds a scheme in it; inline data (base64) has no colon, so it never does.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from scheduler.errors import InvalidRequest

# Keys whose values are free text or identifiers, never fetched.
NOT_URL_KEYS = frozenset({"text", "thinking", "refusal", "type", "uuid", "detail", "format",
                          "filename", "file_id", "name"})
# Names that reach the machine itself or a cloud's instance metadata service.
BLOCKED_NAMES = frozenset({"localhost", "metadata", "metadata.google.internal", "metadata.goog",
                           "instance-data", "instance-data.ec2.internal"})
INLINE_HINT = "send the media inline as a data: URL"
# What urlsplit takes as a scheme: it strips leading C0 controls and spaces and
# drops tabs and newlines anywhere before looking for the colon.
_SCHEME = re.compile(r"[\x00-\x20]*[A-Za-z][A-Za-z0-9+.\-\t\r\n]*:")
_HOSTNAME = re.compile(r"[a-z0-9.\-]+")
# Hosts whose last label is a number are IPv4 addresses to URL parsers (WHATWG).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def check_messages(messages: object, allowed_hosts: tuple[str, ...]) -> None:
    """Raises InvalidRequest naming the field of the first URL refused in
    the content parts of `messages` (a chat body's, as decoded JSON)."""
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                _check_value(part, f"messages[{i}].content[{j}]", allowed_hosts)


def _check_value(value: object, path: str, allowed_hosts: tuple[str, ...]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in NOT_URL_KEYS:
                _check_value(item, f"{path}.{key}", allowed_hosts)
    elif isinstance(value, list):
        for k, item in enumerate(value):
            _check_value(item, f"{path}[{k}]", allowed_hosts)
    elif isinstance(value, str) and _SCHEME.match(value):
        refusal = url_refusal(value, allowed_hosts)
        if refusal:
            raise InvalidRequest(f"`{path}`: {refusal}", param=path)


def url_refusal(url: str, allowed_hosts: tuple[str, ...]) -> str | None:
    """Why `url` may not be fetched by a replica (None: it may)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # a malformed port raises here
    except ValueError:
        return f"this URL cannot be parsed; {INLINE_HINT}."
    scheme = parts.scheme
    if scheme == "data":
        return None
    if scheme not in ("http", "https"):
        return f"{scheme}: URLs are not accepted; {INLINE_HINT}."
    # Parsers disagree about these; a replica's might connect somewhere else.
    if "\\" in url or "@" in parts.netloc or port == 0:
        return "URLs with credentials, backslashes or port 0 are not accepted."
    host = (parts.hostname or "").rstrip(".")
    if blocked_host(host):
        return (f"URLs to {host or 'no host'} are not accepted: not a public host (loopback, "
                f"private, link-local and metadata addresses never are).")
    if host not in allowed_hosts:
        return f"the host {host} is not on ingress.media_url_hosts; {INLINE_HINT}."
    return None


def blocked_host(host: str) -> bool:
    """True for a host no replica may be sent to: a name for this machine or
    a metadata service, an address that is not public (in any form a URL
    parser reads as one: `2130706433`, `0x7f.1`, `::ffff:127.0.0.1`), or
    anything that is neither a plain ASCII name nor an address."""
    host = host.lower()
    if ":" in host:
        try:
            return not _public(ipaddress.IPv6Address(host))
        except ValueError:
            return True
    if not _HOSTNAME.fullmatch(host) or host in BLOCKED_NAMES or host.endswith(".localhost"):
        return True
    if not _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        return False
    address = _ipv4(host)
    return address is None or not _public(address)


def check_allowlist(hosts: tuple[str, ...]) -> None:
    """Raises ValueError for an allowlist entry that is not a lowercase host
    name or public address, or that is one the policy never allows."""
    for host in hosts:
        if host != host.lower().rstrip(".") or blocked_host(host):
            raise ValueError(f"media_url_hosts: {host!r} is not an allowed public host "
                             f"(lowercase, no trailing dot)")


def _ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The address a URL parser reads in `host` (1 to 4 parts, each decimal,
    0x-hex or 0-octal, the last filling the remaining bytes); None: invalid."""
    labels = host.split(".")
    if len(labels) > 4:
        return None
    numbers = []
    for label in labels:
        try:
            if label[:2] in ("0x", "0X"):
                numbers.append(int(label[2:] or "0", 16))
            elif len(label) > 1 and label.startswith("0"):
                numbers.append(int(label, 8))
            else:
                numbers.append(int(label, 10))
        except ValueError:
            return None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for index, number in enumerate(head):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if not address.is_global or address.is_multicast or address.is_reserved:
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return True
    # IPv6 forms that carry an IPv4 address a gateway may connect to.
    embedded = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    if address in _NAT64 or address in _V4_COMPATIBLE:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return all(v4 is None or _public(v4) for v4 in embedded)
