"""`--cors_origin`: pages on the named origins may call the server (the jobs API included) from
a browser with an Authorization header; without it no CORS header is sent (same-origin only)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from dreambooth.serve.app import ServeConfigError, create_app

KEY = "cors-key"
UI = "https://ui.example"


@pytest.fixture(scope="module")
def clients(tiny_model, tmp_path_factory):
    state = tmp_path_factory.mktemp("cors-state")
    allowed = create_app({"base": tiny_model}, api_key=KEY, device="cpu", state_dir=state,
                         cors_origins=[UI, "http://localhost:3000"])
    plain = create_app({"base": tiny_model}, api_key=KEY, device="cpu")
    yield TestClient(allowed), TestClient(plain)
    allowed.state.server.jobs.stop()


def preflight(client: TestClient, origin: str, method: str = "POST"):
    return client.options("/v1/fine_tuning/jobs", headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_an_allowed_origin_may_send_the_api_key(clients):
    allowed, _ = clients
    answer = preflight(allowed, UI)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == UI
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    assert "DELETE" in answer.headers["access-control-allow-methods"]
    listed = allowed.get("/v1/fine_tuning/jobs", headers={
        "Origin": UI, "Authorization": f"Bearer {KEY}"})
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == UI
    # An error answer carries the header too: the page can read why it was refused.
    refused = allowed.get("/v1/fine_tuning/jobs", headers={"Origin": UI})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == UI


def test_other_origins_and_servers_without_the_flag_send_no_cors_headers(clients):
    allowed, plain = clients
    assert preflight(allowed, "https://evil.example").status_code == 400
    answer = allowed.get("/v1/models", headers={"Origin": "https://evil.example",
                                                "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in answer.headers
    answer = plain.get("/v1/models", headers={"Origin": UI, "Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
    assert "access-control-allow-origin" not in preflight(plain, UI).headers


@pytest.mark.parametrize("origin", ["ui.example", "https://ui.example/", "https://ui.example/app",
                                    "ftp://ui.example", "https://*.example", ""])
def test_a_bad_origin_is_refused_at_start(tiny_model, origin):
    with pytest.raises(ServeConfigError, match="--cors_origin"):
        create_app({"base": tiny_model}, device="cpu", cors_origins=[origin])
