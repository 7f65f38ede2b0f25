"""The serving-layer reproducers: each once killed the engine, aborted other requests, or answered 500.

Each hostile request now gets a 4xx in SGLang's error shape (or the stated behaviour) while a bystander
request running at the same time finishes with exactly its greedy text.
"""

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

LONG = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
BIG = 2**64


@pytest.fixture(scope="module")
def alongside(kiln_server: str, solo_greedy) -> Callable[[], Any]:
    """`with alongside():` runs a greedy request through the block and checks it ended with its solo text."""
    expected = solo_greedy("Once upon a time", 48)

    @contextmanager
    def run() -> Iterator[None]:
        got: dict[str, Any] = {}

        def send() -> None:
            with httpx.Client(base_url=kiln_server, timeout=120, trust_env=False) as c:
                got["resp"] = c.post("/generate", json={"text": "Once upon a time", "sampling_params": LONG})

        thread = threading.Thread(target=send)
        thread.start()
        time.sleep(0.3)  # the bystander is running when the hostile request arrives
        yield
        thread.join(timeout=120)
        resp = got["resp"]
        assert resp.status_code == 200, resp.text
        assert resp.json()["text"] == expected["text"]
        assert resp.json()["meta_info"]["finish_reason"] == {"type": "length", "length": 48}

    return run


def native_error(resp: httpx.Response, *needles: str) -> str:
    assert resp.status_code == 400, (resp.status_code, resp.text)
    message = resp.json()["error"]["message"]
    for needle in needles:
        assert needle in message, message
    return message


def openai_error(resp: httpx.Response, *needles: str) -> str:
    assert resp.status_code == 400, (resp.status_code, resp.text)
    body = resp.json()
    assert body["object"] == "error" and body["type"] == "BadRequestError" and body["code"] == 400, body
    for needle in needles:
        assert needle in body["message"], body["message"]
    return body["message"]


@pytest.mark.parametrize(
    "prompt",
    [[[1], [1000000000]], [49152], [[1, 2, 1000000000]], [BIG], [-1]],
    ids=["batch-with-huge-id", "vocab-size", "huge-id-in-batch", "2**64", "negative"],
)
def test_completions_with_ids_outside_the_vocabulary_are_400_and_hurt_nobody(client, alongside, prompt):
    with alongside():
        openai_error(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4}), "prompt")
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "path,body,needle",
    [
        ("/generate", {"text": "hi", "sampling_params": {"top_k": 2**63}}, "top_k"),
        ("/generate", {"text": "hi", "sampling_params": {"sampling_seed": BIG}}, "sampling_seed"),
        ("/generate", {"text": "hi", "return_logprob": True, "logprob_start_len": BIG}, "logprob_start_len"),
        ("/generate", {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5}, "logprob_start_len"),
        ("/generate", {"input_ids": [[1, 2], 3]}, "input_ids"),
        ("/generate", {"text": "hi", "sampling_params": {"n": 5000}}, "n must be in"),
        ("/generate", '{"text": "hi", "sampling_params": {"logit_bias": {"1": 1e999}}}', "logit_bias"),
        ("/generate", {"text": "hi", "sampling_params": {"regex": "[a-"}}, "Invalid regex"),
        ("/detokenize", {"tokens": [BIG]}, "tokens"),
    ],
)
def test_native_hostile_values_are_400(client, alongside, path, body, needle):
    with alongside():
        if isinstance(body, str):
            resp = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            resp = client.post(path, json=body)
        native_error(resp, needle)


@pytest.mark.parametrize(
    "path,body,needle",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": BIG}, "seed"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n must be in"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": -1}, "n must be in"),
        ("/v1/completions", {"prompt": "hi", "n": 0}, "n must be in"),
        ("/v1/score", {"query": [1], "items": [[BIG]], "label_token_ids": [1]}, "outside the vocabulary"),
        ("/v1/score", {"query": "a", "items": ["b"], "label_token_ids": [999999]}, "Token ID 999999 is out of vocabulary"),
    ],
)
def test_openai_hostile_values_are_400(client, alongside, path, body, needle):
    with alongside():
        openai_error(client.post(path, json=body), needle)


@pytest.mark.parametrize("path,field", [("/generate", "input_ids"), ("/detokenize", "tokens"), ("/v1/score", "items"), ("/v1/chat/completions", "messages")])
def test_deeply_nested_arrays_are_400(client, path, field):
    nested = "[" * 5000 + "1" + "]" * 5000
    resp = client.post(path, content=f'{{"{field}": {nested}}}', headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert "Invalid request" in resp.text or "not valid JSON" in resp.text


def test_whole_number_floats_are_integers(generate):
    out = generate({"text": "hi", "sampling_params": {"max_new_tokens": 2.0, "temperature": 0, "ignore_eos": True}})
    assert out["meta_info"]["completion_tokens"] == 2


def test_completions_default_max_tokens_is_per_prompt(client):
    """max_tokens null: each prompt gets the rest of its own context. Had the first one's leaked into the
    second, the second would overrun the context and the request would be a 400 before any chunk."""
    body = {"prompt": [[1, 2], [1] * 300], "max_tokens": None, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        # The first chunk is enough: the second prompt may wait for room in the pool (each reserves
        # part of a whole context's output), and leaving aborts both.
        assert next(line for line in resp.iter_lines() if line.startswith("data: {"))


@contextmanager
def in_flight(client: httpx.Client, rid: str) -> Iterator[None]:
    """A streamed request with `rid`, running until the block ends (then aborted)."""
    with client.stream("POST", "/generate", json={"text": "Count", "rid": rid, "stream": True, "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # it is running
        try:
            yield
        finally:
            client.post("/abort_request", json={"rid": rid})
            for _ in lines:
                pass


def test_a_rid_in_flight_is_refused_and_the_first_request_carries_on(kiln_server, client):
    with httpx.Client(base_url=kiln_server, timeout=60, trust_env=False) as other, in_flight(client, "dup"):
        native_error(other.post("/generate", json={"text": "hi", "rid": "dup"}), "Duplicate request ID detected: dup")
        native_error(other.post("/generate", json={"text": "hi", "rid": "dup", "stream": True}), "Duplicate request ID")
        info = other.get("/get_server_info").json()
        assert info["num_running_reqs"] >= 1


def test_n_copies_colliding_with_another_clients_rid_are_refused(kiln_server, client):
    with httpx.Client(base_url=kiln_server, timeout=60, trust_env=False) as other, in_flight(client, "x-1"):
        native_error(other.post("/generate", json={"text": "hi", "rid": "x", "sampling_params": {"n": 2}}), "Duplicate request ID detected: x-1")


def test_errors_of_unexpected_paths_keep_the_shape(client):
    resp = client.post("/no_such_route", json={})
    assert resp.status_code == 404 and "message" in resp.json()["error"]
    resp = client.get("/v1/completions")
    assert resp.status_code == 405 and resp.json()["object"] == "error"


def test_openapi_describes_every_request_body(client):
    doc = client.get("/openapi.json").json()
    for path, method, schema in [
        ("/generate", "post", "GenerateReqInput"),
        ("/v1/completions", "post", "CompletionRequest"),
        ("/v1/chat/completions", "post", "ChatCompletionRequest"),
        ("/tokenize", "post", "TokenizeReqInput"),
        ("/v1/score", "post", "ScoreRequest"),
        ("/encode", "put", "EncodeReqInput"),
    ]:
        ref = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{schema}"
    params = doc["components"]["schemas"]["SamplingParams"]["properties"]
    assert params["top_k"]["maximum"] == 2**63 - 1
    assert client.get("/schema/openapi.json").json() == doc


def test_the_http_side_imports_no_torch():
    code = "import sys, time; t = time.perf_counter(); import kiln.serving.api.app, kiln.serving.cli; print(time.perf_counter() - t); " \
           "sys.exit(int(any(m in sys.modules for m in ('torch', 'kiln.models', 'kiln.compiler', 'kiln.serving.engine'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    print(f"importing the HTTP side took {float(out.stdout):.2f}s")
