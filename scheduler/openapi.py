"""The admin API's OpenAPI 3.1 document, built from its operation table
(scheduler/admin_api.py) and the msgspec schemas of its bodies, so the
document cannot drift from what is served. Each operation names the roles
that may call it (`x-switchyard-roles`) and whether non-platform roles act
only on their own tenant (`x-switchyard-tenant-scoped`).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from scheduler.admin_api import API_VERSION, OPERATIONS, Operation, allowed_roles, tenant_scoped

REF_TEMPLATE = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"\{(\w+)\}")


class ErrorObject(msgspec.Struct, frozen=True, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """OpenAI's error shape (scheduler/errors.py)."""
    error: ErrorObject


_ERRORS = {
    "400": "Malformed JSON, or a field missing or invalid.",
    "401": "No key, an unknown, revoked or expired key, or a key in the URL.",
    "403": "The key's role may not perform this operation.",
    "404": "No such record, or another tenant's.",
    "409": "The record's state forbids the change.",
}


def _schema_types() -> list[Any]:
    found: list[Any] = [ErrorBody]
    for op in OPERATIONS:
        for type_ in (op.body, op.response):
            if type_ not in (None, dict, str) and type_ not in found:
                found.append(type_)
    return found


def _ref(type_: Any) -> dict[str, Any]:
    if type_ is dict:
        return {"type": "object"}
    if type_ is str:
        return {"type": "string"}
    return {"$ref": REF_TEMPLATE.format(name=type_.__name__)}


def _operation(op: Operation) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(op.path)]
    params += [{"name": q.name, "in": "query", "required": False,
                "description": q.description, "schema": {"type": q.kind}} for q in op.query]
    answers: dict[str, Any] = {op.content_type: {"schema": _ref(op.response)}}
    if any(q.name == "format" for q in op.query):
        answers["text/csv"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {str(op.status): {"description": "OK", "content": answers}}
    error = {"content": {"application/json": {"schema": _ref(ErrorBody)}}}
    codes = ["400"] if op.action is None else list(_ERRORS)
    for code in codes:
        responses[code] = {"description": _ERRORS[code], **error}
    doc: dict[str, Any] = {
        "operationId": op.operation_id, "summary": op.summary, "responses": responses,
        "x-switchyard-roles": list(allowed_roles(op.action)),
        "x-switchyard-tenant-scoped": tenant_scoped(op.action),
        "security": [] if op.action is None else [{"bearer": []}],
    }
    if params:
        doc["parameters"] = params
    if op.body is not None:
        content: dict[str, Any] = {"schema": _ref(op.body)}
        if op.example is not None:
            content["example"] = op.example
        # Bodies whose fields all have defaults may be left out.
        required = any(f.required for f in msgspec.structs.fields(op.body))
        doc["requestBody"] = {"required": required, "content": {"application/json": content}}
    return doc


def openapi_document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(_schema_types(), ref_template=REF_TEMPLATE)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "switchyard admin API", "version": API_VERSION,
                 "description": "Tenants, API keys, prices and the audit log. Send an admin "
                                "key as `Authorization: Bearer <key>`; never in the URL."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "A switchyard API key (sy-...)."}},
        },
    }
