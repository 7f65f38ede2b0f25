"""--skip-tokenizer-init (ids in, ids out, no text) with --incremental-streaming-output, as RL frameworks use it."""

import json

import httpx
import pytest


@pytest.fixture(scope="module")
def ids_only(launch_kiln):
    args = ["--dtype", "float32", "--max-total-tokens", "2048", "--disable-compile", "--skip-tokenizer-init", "--incremental-streaming-output"]
    with launch_kiln(args) as url, httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
        yield c


def test_ids_in_ids_out_equal_the_tokenizing_server(ids_only, client, tokenize):
    ids = tokenize("The capital of France is")
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    expected = client.post("/generate", json={"input_ids": ids, "sampling_params": params}).json()
    out = ids_only.post("/generate", json={"input_ids": ids, "sampling_params": params}).json()
    assert "text" not in out and out["output_ids"] == expected["output_ids"]
    assert out["meta_info"]["completion_tokens"] == 8


def test_each_stream_chunk_carries_only_its_new_ids(ids_only, client, tokenize):
    ids = tokenize("Once upon a time")
    params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    expected = client.post("/generate", json={"input_ids": ids, "sampling_params": params}).json()["output_ids"]
    chunks = []
    with ids_only.stream("POST", "/generate", json={"input_ids": ids, "sampling_params": params, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    assert len(chunks) > 1 and all("text" not in c for c in chunks)
    assert [t for c in chunks for t in c["output_ids"]] == expected
    assert chunks[-1]["meta_info"]["completion_tokens"] == 10


@pytest.mark.parametrize(
    "path, body, needle",
    [
        ("/generate", {"text": "hi"}, "Text input needs the tokenizer"),
        ("/generate", {"input_ids": [1, 2], "sampling_params": {"stop": "x"}}, "stop needs the tokenizer"),
        ("/generate", {"input_ids": [1, 2], "sampling_params": {"json_schema": "{}"}}, "json_schema needs the tokenizer"),
        ("/v1/completions", {"prompt": [1, 2]}, "/v1/completions needs the tokenizer"),
        ("/tokenize", {"prompt": "hi"}, "Text input needs the tokenizer"),
    ],
)
def test_what_needs_text_is_a_400(ids_only, path, body, needle):
    r = ids_only.post(path, json=body)
    message = r.json()["message"] if path.startswith("/v1/") else r.json()["error"]["message"]
    assert r.status_code == 400 and needle in message, r.text
