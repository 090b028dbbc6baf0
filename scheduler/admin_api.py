"""The admin API's operations: one table, from which the admin server
registers its routes, checks who may call them, and builds its OpenAPI
document, and whose bodies the `switchyard` CLI sends.

Who may perform an operation is its control-plane `Action`
(scheduler/access.py): a route is served only if it has a row here (deny by
default), and only `public` rows need no key. Bodies are strict (an unknown
field is a 400, also inside `limits` and `priority`); views leave secrets
out (no digests, no cache salts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from scheduler.access import OWN_TENANT_ROLES, Action
from scheduler.audit import AuditEntry
from scheduler.billing import Statement
from scheduler.control import (
    ROLES,
    KeyRecord,
    KeyStatus,
    Role,
    TenantRecord,
    public_key,
    public_tenant,
)
from scheduler.priority import PriorityRange
from scheduler.tenancy import Price, TenantLimits, TenantStatus
from scheduler.wire.usage import UsageRow

PREFIX = "/admin/v1"
API_VERSION = "1"
MAX_AUDIT_PAGE_ENTRIES = 1_000
# Far enough in the future for any example price to be accepted.
EXAMPLE_EFFECTIVE_FROM_S = 4_102_444_800

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100,
                                   pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")]
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class _Body(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class StrictLimits(TenantLimits, forbid_unknown_fields=True):
    """TenantLimits as a request field: an unknown (misspelt) limit is refused."""

    def limits(self) -> TenantLimits:
        return TenantLimits(**msgspec.structs.asdict(self))


class StrictPriority(PriorityRange, forbid_unknown_fields=True):
    def priority(self) -> PriorityRange:
        return PriorityRange(**msgspec.structs.asdict(self))


class TenantCreate(_Body):
    name: Name
    limits: StrictLimits = StrictLimits()
    # The models its keys may call; empty: every model.
    models: tuple[ModelName, ...] = ()
    priority: StrictPriority = StrictPriority()


class TenantUpdate(_Body):
    """What is given changes; what is left out stays."""
    limits: StrictLimits | None = None
    models: tuple[ModelName, ...] | None = None
    priority: StrictPriority | None = None


class KeyCreate(_Body):
    name: Annotated[str, msgspec.Meta(max_length=100)] = ""
    role: Role = "user"
    # Unix seconds after which the key stops working; 0: never.
    expires_at_s: NonNegative = 0


class KeyRotate(_Body):
    # How long the old key keeps working; absent: auth.rotation_grace_s.
    grace_s: Annotated[float, msgspec.Meta(ge=0, le=30 * 86_400)] | None = None


class PriceSet(_Body):
    """A model's price from `effective_from_s` (now or later) on."""
    effective_from_s: NonNegative
    input_nusd_per_token: NonNegative
    cached_input_nusd_per_token: NonNegative
    output_nusd_per_token: NonNegative

    def price(self) -> Price:
        return Price(**msgspec.structs.asdict(self))


class _View(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Views are converted from the records' public dicts and refuse fields
    they do not know, so a field added to a record fails the tests until the
    view (and the API document) says whether to show it."""


class TenantView(_View):
    tenant_id: str
    name: str
    status: TenantStatus
    limits: TenantLimits
    models: tuple[str, ...]
    priority: PriorityRange
    created_at_s: int
    version: int


class KeyView(_View):
    key_id: str
    tenant_id: str
    hint: str
    name: str
    role: Role
    status: KeyStatus
    created_at_s: int
    expires_at_s: int
    rotated_to: str
    version: int


class IssuedKey(msgspec.Struct, frozen=True, kw_only=True):
    # The plaintext: shown here once, stored nowhere.
    key: str
    record: KeyView


class TenantList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[TenantView]


class KeyList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[KeyView]


class ModelPrices(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    prices: tuple[Price, ...]


class PriceList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[ModelPrices]


class AuditPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[AuditEntry]
    # Pass as `after_version` for the next page; 0 when this one is the last.
    next_after_version: int = 0


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: str


class UsageRows(msgspec.Struct, frozen=True, kw_only=True):
    rows: tuple[UsageRow, ...]


@dataclass(frozen=True, slots=True)
class CsvExport:
    """A handler's answer when `format=csv` was asked for."""
    text: str
    filename: str


def tenant_view(tenant: TenantRecord) -> TenantView:
    return msgspec.convert(public_tenant(tenant), TenantView)


def key_view(key: KeyRecord) -> KeyView:
    return msgspec.convert(public_key(key), KeyView)


@dataclass(frozen=True, slots=True)
class QueryParam:
    name: str
    kind: str  # "string" | "integer"
    description: str


@dataclass(frozen=True, slots=True)
class Operation:
    operation_id: str
    method: str
    # aiohttp's and OpenAPI's template syntax alike: {tenant_id}.
    path: str
    summary: str
    # The control-plane action it performs; None: public (no key asked).
    action: Action | None
    response: type[Any]
    status: int = 200
    body: type[Any] | None = None
    query: tuple[QueryParam, ...] = ()
    example: dict[str, Any] | None = None
    # Of a successful answer; the dashboard's page and files are not JSON.
    content_type: str = "application/json"


_T = PREFIX + "/tenants/{tenant_id}"
_FORMAT = QueryParam("format", "string", "json (default) or csv (RFC 4180, with a header)")
_K = PREFIX + "/keys/{key_id}"

OPERATIONS: tuple[Operation, ...] = (
    Operation("health", "GET", "/healthz", "Liveness.", None, Health),
    Operation("openapi", "GET", PREFIX + "/openapi.json", "This document.", None, dict),
    Operation("list_tenants", "GET", PREFIX + "/tenants", "Every tenant.", "tenant.list",
              TenantList),
    Operation("create_tenant", "POST", PREFIX + "/tenants", "Create a tenant.",
              "tenant.create", TenantView, 201, TenantCreate,
              example={"name": "acme", "limits": {"requests_per_minute": 600},
                       "models": ["switchyard-tiny"]}),
    Operation("get_tenant", "GET", _T, "One tenant.", "tenant.read", TenantView),
    Operation("update_tenant", "PATCH", _T, "Change a tenant's limits, models or priority.",
              "tenant.update", TenantView, body=TenantUpdate,
              example={"limits": {"requests_per_minute": 1200, "budget_nusd": 10**10,
                                  "budget_period": "month"}}),
    Operation("suspend_tenant", "POST", _T + "/suspend",
              "Suspend a tenant: its keys stop working.", "tenant.suspend", TenantView),
    Operation("resume_tenant", "POST", _T + "/resume", "Resume a suspended tenant.",
              "tenant.resume", TenantView),
    Operation("list_keys", "GET", _T + "/keys", "A tenant's keys (hints only).", "key.read",
              KeyList),
    Operation("create_key", "POST", _T + "/keys", "Issue a key: the plaintext is shown once.",
              "key.create", IssuedKey, 201, KeyCreate,
              example={"name": "ci", "role": "user"}),
    Operation("get_key", "GET", _K, "One key (hint only).", "key.read", KeyView),
    Operation("rotate_key", "POST", _K + "/rotate",
              "Issue a replacement; the old key works for the grace period.", "key.rotate",
              IssuedKey, 201, KeyRotate, example={"grace_s": 3600}),
    Operation("revoke_key", "POST", _K + "/revoke", "Stop a key at once.", "key.revoke",
              KeyView),
    Operation("list_prices", "GET", PREFIX + "/prices", "Every model's prices.",
              "price.read", PriceList),
    Operation("set_price", "POST", PREFIX + "/prices/{model}",
              "Add a model's price from a date on.", "price.set", ModelPrices, body=PriceSet,
              example={"effective_from_s": EXAMPLE_EFFECTIVE_FROM_S,
                       "input_nusd_per_token": 150, "cached_input_nusd_per_token": 75,
                       "output_nusd_per_token": 600}),
    Operation("list_audit", "GET", PREFIX + "/audit",
              "Audit entries, oldest first; a tenant's own only, for tenant admins.",
              "audit.read", AuditPage, query=(
                  QueryParam("tenant_id", "string", "only entries about this tenant"),
                  QueryParam("after_version", "integer", "entries after this version"),
                  QueryParam("limit", "integer",
                             f"at most this many (1-{MAX_AUDIT_PAGE_ENTRIES})"))),
    Operation("get_usage", "GET", PREFIX + "/usage",
              "Usage by time range, grouped; a tenant's own only, for tenant keys.",
              "usage.read", UsageRows, query=(
                  QueryParam("tenant_id", "string", "only this tenant (tenant keys: their own)"),
                  QueryParam("from", "string", "start, ISO 8601 or unix seconds (default: "
                                               "24 h before `to`)"),
                  QueryParam("to", "string", "end, exclusive (default: now)"),
                  QueryParam("group_by", "string",
                             "comma list of model, key and one of day, hour, minute"),
                  _FORMAT)),
    Operation("get_statement", "GET", _T + "/statements/{month}",
              "A tenant's monthly statement (month: YYYY-MM, UTC).", "billing.read",
              Statement, query=(_FORMAT,)),
    # Public: the page and its files hold no data; its data calls send the
    # key the page asks for (the usage operation above).
    Operation("dashboard", "GET", PREFIX + "/dashboard",
              "The usage dashboard: an HTML page charting the usage operation.", None, str,
              content_type="text/html"),
    Operation("dashboard_asset", "GET", PREFIX + "/dashboard/{asset}",
              "The dashboard's script and styles, and its charting library (uPlot).", None,
              str, content_type="text/*"),
)
BY_ID: dict[str, Operation] = {op.operation_id: op for op in OPERATIONS}
BY_ROUTE: dict[tuple[str, str], Operation] = {(op.method, op.path): op for op in OPERATIONS}


def allowed_roles(action: Action | None) -> tuple[Role, ...]:
    """Every role that may perform `action` on some tenant's records (its
    own, or any for platform admins); None (public): every role."""
    if action is None:
        return ROLES
    own = OWN_TENANT_ROLES.get(action, frozenset())
    return tuple(role for role in ROLES if role == "platform_admin" or role in own)


def tenant_scoped(action: Action | None) -> bool:
    """Whether roles other than platform admin may perform it (on their own
    tenant's records only)."""
    return action is not None and bool(OWN_TENANT_ROLES.get(action))

