"""--api-key and --admin-api-key over every route, as SGLang checks them, and keys kept out of every answer and log."""

import httpx
import openai
import pytest

# The routes that change server state: only the admin key opens them when one is set.
ADMIN_ROUTES = {
    "/flush_cache", "/abort_request", "/update_weights_from_disk", "/update_weight_version", "/pause_generation",
    "/continue_generation", "/start_expert_distribution_record", "/stop_expert_distribution_record", "/dump_expert_distribution_record",
}  # fmt: skip
OPEN_PREFIXES = ("/health", "/metrics")
# Bodies that an authorised call answers harmlessly (a 400, or a no-op).
BODIES = {"/pause_generation": {"mode": "not-a-mode"}}


@pytest.fixture(scope="module")
def routes(keyed_server) -> list[tuple[str, str]]:
    doc = keyed_server.client.get("/openapi.json").json()
    found = [(method.upper(), path) for path, ops in doc["paths"].items() for method in ops if method in ("get", "post", "put")]
    assert {p for _, p in found} >= ADMIN_ROUTES | {"/generate", "/v1/chat/completions", "/get_server_info", "/health"}
    return found + [("GET", "/metrics")]


def call(url: str, method: str, path: str, headers: dict[str, str]) -> int:
    body = BODIES.get(path, {}) if method != "GET" else None
    return httpx.request(method, url + path, json=body, headers=headers, timeout=60, trust_env=False).status_code


def test_every_route_takes_the_key_it_needs(keyed_server, routes):
    s = keyed_server
    creds = {
        "none": {},
        "wrong": {"Authorization": "Bearer not-the-key"},
        "api": {"Authorization": f"Bearer {s.api_key}"},
        "api_x": {"x-api-key": s.api_key},
        "api_lowercase_scheme": {"Authorization": f"bearer {s.api_key}"},
        "admin": {"Authorization": f"Bearer {s.admin_key}"},
        "admin_x": {"x-api-key": s.admin_key},
    }
    for method, path in routes:
        if path.startswith(OPEN_PREFIXES):
            allowed = set(creds)
        elif path in ADMIN_ROUTES:
            allowed = {"admin", "admin_x"}
        else:
            allowed = {"api", "api_x", "api_lowercase_scheme"}
        for name, headers in creds.items():
            status = call(s.url, method, path, headers)
            if name in allowed:
                assert status != 401, (method, path, name)
            else:
                assert status == 401, (method, path, name, status)


def test_the_refusal_is_sglangs(keyed_server):
    resp = httpx.post(keyed_server.url + "/generate", json={"text": "hi"}, trust_env=False)
    assert (resp.status_code, resp.json()) == (401, {"error": "Unauthorized"})
    resp = keyed_server.client.post("/flush_cache")  # the API key does not open an admin route
    assert (resp.status_code, resp.json()) == (401, {"error": "Unauthorized"})


def test_the_openai_sdk_sends_the_key_unmodified(keyed_server):
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=keyed_server.api_key)
    assert [m.id for m in client.models.list().data]
    out = client.completions.create(model="default", prompt="One, two,", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="wrong").models.list()


def test_keys_appear_in_no_answer_and_no_log(keyed_server):
    s = keyed_server
    info = s.client.get("/get_server_info")
    assert info.status_code == 200 and "api_key" not in info.json() and "admin_api_key" not in info.json()
    texts = [info.text, s.client.post("/generate", json={"text": 5}).text, httpx.get(s.url + "/generate", trust_env=False).text, s.process.log()]
    for text in texts:
        assert s.api_key not in text and s.admin_key not in text
