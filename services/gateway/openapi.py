"""The OpenAPI 3.1 description of the node's public and admin HTTP API, served at `/openapi.json`.

Written by hand from the routes (the gateway has no schema framework): each operation lists the
answers it gives, errors included, so a fuzzer can hold the node to it (tests/test_openapi.py).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from aiohttp import web

from services.gateway.admin import ROUTES

OBJECT = {"type": "object"}
DETAIL = {"$ref": "#/components/schemas/Detail"}
OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIError"}
ADMIN_ERRORS = (400, 401, 403, 404, 409, 413, 429, 503)
PUBLIC_ERRORS = (400, 401, 402, 403, 404, 405, 413, 425, 429, 502, 503, 504)

SCHEMAS: dict[str, Any] = {
    "Detail": {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"},
                                                                        "code": {"type": "string"}}},
    "OpenAIError": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"}, "param": {}, "code": {}}}},
    },
    "Login": {"type": "object", "required": ["ok", "token", "expires_in"],
              "properties": {"ok": {"const": True}, "token": {"type": "string"}, "expires_in": {"type": "integer"}}},
    "Ok": {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}},
    "MintBalance": {
        "type": "object", "required": ["mint_url", "unit", "wallet_balance", "user_balance", "owner_balance"],
        "properties": {"mint_url": {"type": "string"}, "unit": {"type": "string"},
                       "wallet_balance": {"type": "integer"}, "user_balance": {"type": "integer"},
                       "owner_balance": {"type": "integer"}, "error": {"type": "string"}},
    },
    "Withdrawal": {
        "type": "object", "required": ["withdrawal_id", "token", "mint_url", "amount", "status"],
        "properties": {"withdrawal_id": {"type": "string"}, "token": {"type": ["string", "null"]},
                       "mint_url": {"type": ["string", "null"]}, "amount": {"type": "integer"},
                       "unit": {"const": "sat"}, "status": {"enum": ["pending", "paid", "failed"]}},
    },
    "Model": {
        "type": "object", "required": ["id", "name", "pricing", "alias_ids", "enabled"],
        "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "description": {"type": "string"},
                       "created": {"type": "integer"}, "context_length": {"type": ["integer", "null"]},
                       "architecture": OBJECT, "pricing": OBJECT,
                       "alias_ids": {"type": "array", "items": {"type": "string"}}, "enabled": {"type": "boolean"},
                       "forwarded_model_id": {"type": ["string", "null"]}},
    },
    "ModelEdit": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "enabled": {"type": "boolean"},
                       "pricing": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
                       "alias_ids": {"type": "array", "items": {"type": "string"}},
                       "forwarded_model_id": {"type": ["string", "null"]}},
    },
}  # fmt: skip

# Request bodies and success answers of the admin operations (the rest: an object).
ADMIN_BODIES: dict[str, dict] = {
    "login": {"type": "object", "required": ["password"], "properties": {"password": {"type": "string"}}},
    "password": {"type": "object", "required": ["current_password", "new_password"],
                 "properties": {"current_password": {"type": "string"}, "new_password": {"type": "string"}}},
    "cli_token_create": {"type": "object", "required": ["name"],
                         "properties": {"name": {"type": "string"}, "expires_in_days": {"type": "integer"}}},
    "withdraw": {"type": "object", "required": ["amount"],
                 "properties": {"amount": {"type": "integer", "minimum": 1}, "unit": {"const": "sat"},
                                "mint_url": {"type": "string"}, "lightning_address": {"type": "string"},
                                "idempotency_key": {"type": "string"}}},
    "settings_update": OBJECT,
    "nsec": {"type": "object", "required": ["nsec"], "properties": {"nsec": {"type": "string"}}},
    "provider_create": {"type": "object", "required": ["provider_type"],
                        "properties": {"provider_type": {"type": "string"}, "base_url": {"type": "string"},
                                       "api_key": {"type": "string"}, "slug": {"type": "string"},
                                       "enabled": {"type": "boolean"}, "provider_fee": {"type": "number"}}},
    "provider_update": OBJECT,
    "model_upsert": {"allOf": [{"$ref": "#/components/schemas/ModelEdit"}, {"required": ["id"]}]},
    "model_update": {"$ref": "#/components/schemas/ModelEdit"},
}  # fmt: skip
ADMIN_ANSWERS: dict[str, dict] = {
    "login": {"$ref": "#/components/schemas/Login"},
    "logout": {"$ref": "#/components/schemas/Ok"},
    "nsec": {"type": "object", "required": ["ok", "npub"], "properties": {"npub": {"type": "string"}}},
    "balances": {"type": "array", "items": {"$ref": "#/components/schemas/MintBalance"}},
    "withdraw": {"$ref": "#/components/schemas/Withdrawal"},
    "cli_tokens": {"type": "array", "items": OBJECT},
    "providers": {"type": "array", "items": OBJECT},
    "provider_types": {"type": "array", "items": OBJECT},
    "models": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
    "model": {"$ref": "#/components/schemas/Model"},
    "model_update": {"$ref": "#/components/schemas/Model"},
    "model_upsert": {"$ref": "#/components/schemas/Model"},
}
QUERY: dict[str, list[tuple[str, dict]]] = {
    "temporary_balances": [("search", {"type": "string"}), ("limit", {"type": "integer"}),
                           ("offset", {"type": "integer"})],
    "transactions": [("type", {"type": "string"}), ("status", {"type": "string"}), ("limit", {"type": "integer"})],
    "logs": [("request_id", {"type": "string"}), ("model", {"type": "string"}), ("status", {"type": "integer"}),
             ("hours", {"type": "integer"}), ("limit", {"type": "integer"})],
    **{op: [("hours", {"type": "integer", "minimum": 1, "maximum": 8760})]
       for op in ("usage_summary", "usage_dashboard", "usage_revenue_by_model", "usage_error_details")},
}  # fmt: skip


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(statuses: tuple[int, ...], schema: dict) -> dict:
    return {str(status): _json(schema, "Refused") for status in statuses}


def _admin_operation(method: str, path: str, op: str) -> dict:
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in ("provider", "model_id", "id") if "{" + name in path]  # fmt: skip
    params += [{"name": n, "in": "query", "required": False, "schema": s} for n, s in QUERY.get(op, [])]
    if op == "withdraw":
        params.append({"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}})
    operation: dict[str, Any] = {
        "operationId": f"admin_{op}_{method.lower()}_{path.count('/')}" + ("_core" if "/api/" not in path else ""),
        "tags": ["admin"],
        "parameters": params,
        "responses": {
            "200": _json(ADMIN_ANSWERS.get(op, {"type": ["object", "array"]})),
            **_errors(ADMIN_ERRORS, DETAIL),
        },
    }
    if op != "login":
        operation["security"] = [{"bearer": []}]
    if method in ("POST", "PATCH"):
        operation["requestBody"] = {
            "required": op in ADMIN_BODIES,
            "content": {"application/json": {"schema": ADMIN_BODIES.get(op, OBJECT)}},
        }
    return operation


def _public() -> dict:
    key = [{"bearer": []}]
    chat_body = {"type": "object", "required": ["model", "messages"],
                 "properties": {"model": {"type": "string"}, "messages": {"type": "array", "items": OBJECT},
                                "max_tokens": {"type": "integer"}, "stream": {"type": "boolean"}}}  # fmt: skip
    return {
        "/v1/models": {"get": {"operationId": "list_models", "tags": ["public"], "responses": {
            "200": _json({"type": "object", "required": ["data"], "properties": {"data": {"type": "array"}}}),
            **_errors((503,), OPENAI_ERROR)}}},
        "/v1/info": {"get": {"operationId": "node_info", "tags": ["public"], "responses": {"200": _json(OBJECT)}}},
        "/v1/balance/info": {"get": {"operationId": "balance_info", "tags": ["balance"], "security": key,
                                     "responses": {"200": _json(OBJECT), **_errors(PUBLIC_ERRORS, DETAIL)}}},
        "/v1/balance/create": {"get": {
            "operationId": "balance_create", "tags": ["balance"],
            "parameters": [{"name": "initial_balance_token", "in": "query", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": _json(OBJECT), **_errors(PUBLIC_ERRORS, DETAIL)}}},
        "/v1/balance/topup": {"post": {
            "operationId": "balance_topup", "tags": ["balance"], "security": key,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["cashu_token"], "properties": {"cashu_token": {"type": "string"}}}}}},
            "responses": {"200": _json(OBJECT), **_errors(PUBLIC_ERRORS, DETAIL)}}},
        "/v1/balance/refund": {"post": {"operationId": "balance_refund", "tags": ["balance"], "security": key,
                                        "responses": {"200": _json(OBJECT), **_errors(PUBLIC_ERRORS, DETAIL)}}},
        "/v1/chat/completions": {"post": {
            "operationId": "chat_completions", "tags": ["public"], "security": key,
            "requestBody": {"required": True, "content": {"application/json": {"schema": chat_body}}},
            "responses": {"200": _json(OBJECT), **_errors(PUBLIC_ERRORS, OPENAI_ERROR)}}},
        "/healthz": {"get": {"operationId": "healthz", "tags": ["ops"], "responses": {"200": _json(OBJECT)}}},
    }  # fmt: skip


def spec() -> dict:
    """The whole OpenAPI 3.1 document."""
    paths: dict[str, dict] = _public()
    for method, path, op in ROUTES:
        paths.setdefault(path.replace("{model_id:.+}", "{model_id}"), {})[method.lower()] = _admin_operation(
            method, path, op
        )
    try:
        version = metadata.version("routstr-node")
    except metadata.PackageNotFoundError:
        version = "0"
    return {
        "openapi": "3.1.0",
        "info": {"title": "Routstr node", "version": version,
                 "description": "OpenAI-compatible AI gateway paid with Cashu ecash, and its operator API."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }  # fmt: skip


SPEC = web.AppKey("openapi_spec", dict)


async def _serve(request: web.Request) -> web.Response:
    return web.json_response(request.app[SPEC])


def add_routes(app: web.Application) -> None:
    app[SPEC] = spec()
    app.router.add_get("/openapi.json", _serve)
