"""The OpenAPI 3.1 document at /openapi.json: valid, complete for the admin API, and true of the running
node under schemathesis's fuzzing (no 5xx, every answer's status, content type and body as documented)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from openapi_spec_validator import validate

from services.gateway.admin import ROUTES
from tests.test_admin import PASSWORD, login

ST = Path(sys.executable).with_name("st")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


async def test_document_is_valid_openapi_31_and_lists_every_admin_route(make_node, http):
    node = await make_node(("billing", "gateway"))
    async with http.get(f"{node.url}/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    for method, path, _ in ROUTES:
        assert method.lower() in document["paths"][path.replace("{model_id:.+}", "{model_id}")], path
    assert "/v1/chat/completions" in document["paths"] and "/v1/models" in document["paths"]


async def test_fuzzed_node_answers_as_documented(make_node, http, tmp_path):
    # With discovery, so PATCH /admin/api/nsec is answered; the keys it sets live in this test's own
    # database and NATS only.
    node = await make_node(("billing", "discovery", "gateway"), ADMIN_PASSWORD=PASSWORD, RATE_LIMIT_PER_MINUTE="0")
    token = await login(http, node.url)
    proc = await asyncio.create_subprocess_exec(
        str(ST), "run", f"{node.url}/openapi.json", "--checks", CHECKS, "--max-examples", "4",
        "--phases", "examples,fuzzing", "--header", f"Authorization: Bearer {token}",
        "--exclude-path-regex", "logout|password", "--generation-deterministic", "--request-timeout", "10",
        "--no-color", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"},
    )  # fmt: skip
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=110)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "passed" in text.lower()
