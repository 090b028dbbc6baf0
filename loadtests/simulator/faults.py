"""Faults a replica can be told to show, through `POST /sim/faults`.

The body is a JSON object; every POST replaces the whole set, so `{}` clears
them all. `GET /sim/faults` returns the set in force.

- `crash`: the replica stops listening and resets every open connection; its
  in-flight requests end as aborted and its KV-event publisher stops. It does
  not come back. A simulator process exits (status 1) once all its replicas
  have crashed, so a one-replica process behaves like a crashed vLLM.
- `refuse_connections_s`: the listening socket closes for this many seconds
  (new connections are refused), then listens again on the same port; open
  connections carry on.
- `hang_before_first_byte`: generation requests get no byte of response until
  the client gives up (recorded as aborted).
- `stall_after_tokens`: a response stops after this many tokens and holds its
  connection open, silent, until the client gives up; the engine drops the
  request at that point (recorded as aborted when the client leaves).
- `error_status`: generation requests are answered with this 5xx status and
  vLLM's error body.
- `slow_start_s`: for this many seconds from now /health answers 503 and
  generation requests get 503, as while vLLM loads a model.

Faults apply to requests that arrive while they are set.
"""

from __future__ import annotations

from http import HTTPStatus

import msgspec

_ERROR_TYPES = {500: "InternalServerError", 503: "ServiceUnavailableError"}


class FaultSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    crash: bool = False
    refuse_connections_s: float = 0.0
    hang_before_first_byte: bool = False
    stall_after_tokens: int | None = None
    error_status: int | None = None
    slow_start_s: float = 0.0


class FaultSpecError(ValueError):
    pass


_DECODER = msgspec.json.Decoder(FaultSpec)


def decode_faults(body: bytes) -> FaultSpec:
    """Parses and checks a fault body; raises FaultSpecError naming the problem."""
    try:
        spec = _DECODER.decode(body or b"{}")
    except msgspec.DecodeError as exc:
        raise FaultSpecError(f"Invalid fault body: {exc}") from None
    if spec.error_status is not None and not 500 <= spec.error_status <= 599:
        raise FaultSpecError("error_status must be a 5xx status")
    if spec.stall_after_tokens is not None and spec.stall_after_tokens < 0:
        raise FaultSpecError("stall_after_tokens must not be negative")
    if spec.refuse_connections_s < 0 or spec.slow_start_s < 0:
        raise FaultSpecError("durations must not be negative")
    return spec


def error_type(status: int) -> str:
    """The `type` vLLM's error body gives a server-side status."""
    return _ERROR_TYPES.get(status, HTTPStatus(status).phrase.replace(" ", ""))
