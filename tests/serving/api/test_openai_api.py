"""OpenAI-compatible endpoints against the native /generate of the same server."""

import json

import httpx


def test_completion_matches_native_generate(client: httpx.Client, generate):
    prompt = "The capital of France is"
    native = generate({"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 8}})
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == native["text"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": native["meta_info"]["prompt_tokens"], "completion_tokens": 8, "total_tokens": native["meta_info"]["prompt_tokens"] + 8}


def test_chat_completion_uses_the_chat_template(client: httpx.Client, generate, tokenize):
    chat = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    native = generate({"input_ids": tokenize(chat), "sampling_params": {"temperature": 0, "max_new_tokens": 12}})
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == native["text"]
    assert r.json()["usage"]["prompt_tokens"] == native["meta_info"]["prompt_tokens"]


def test_chat_stream_deltas_add_up(client: httpx.Client):
    body = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 10, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_errors_use_the_openai_shape(client: httpx.Client):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "top_p": 0})
    assert r.status_code == 400
    body = r.json()
    assert body["object"] == "error" and body["code"] == 400 and body["type"] == "BadRequestError"
    assert "top_p" in body["message"]
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["message"] == "Messages cannot be empty."


def test_models_retrieve_with_the_sdk(kiln_server: str, client: httpx.Client):
    import openai

    sdk = openai.OpenAI(base_url=kiln_server + "/v1", api_key="unused")
    name = client.get("/v1/models").json()["data"][0]["id"]
    card = sdk.models.retrieve(name)
    assert (card.id, card.object) == (name, "model")
    r = client.get("/v1/models/no-such-model")
    assert r.status_code == 404
    assert r.json() == {
        "error": {"message": "The model 'no-such-model' does not exist", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    }
    try:
        sdk.models.retrieve("no-such-model")
        raise AssertionError("expected a 404")
    except openai.NotFoundError as exc:
        assert exc.status_code == 404


def test_chat_max_tokens_over_the_context_is_sglangs_400(client: httpx.Client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**6})
    assert r.status_code == 400
    assert r.json()["message"] == "max_completion_tokens is too large: 1000000.This model supports at most 8192 completion tokens."
