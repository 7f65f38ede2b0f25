"""OpenAI logprobs on /v1/completions and /v1/chat/completions: the native logprobs in OpenAI's layouts."""

import json

import pytest

PROMPT = "The capital of France is"
CHAT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"


def native(generate, body: dict, top: int) -> dict:
    extra = {"return_logprob": True, "top_logprobs_num": top, "return_text_in_logprobs": True}
    return generate({**body, **extra})["meta_info"]


def test_completion_logprobs_equal_the_native_ones(client, generate):
    meta = native(generate, {"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 8}}, 3)
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"] == [t[2] for t in meta["output_token_logprobs"]]
    assert lp["token_logprobs"] == pytest.approx([t[0] for t in meta["output_token_logprobs"]], abs=1e-5)
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(8)]
    for top, chosen, logprob in zip(lp["top_logprobs"], lp["tokens"], lp["token_logprobs"]):
        assert len(top) == 3 and max(top, key=top.get) == chosen  # greedy picks the most likely token
        assert top[chosen] == pytest.approx(logprob, abs=1e-5)


def test_completion_echo_scores_the_prompt(client, tokenize):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    n = len(tokenize(PROMPT))
    assert len(lp["tokens"]) == n + 4 and "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v < 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"][:n]) == PROMPT


def test_chat_logprobs_equal_the_native_ones(client, generate, tokenize):
    body = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 6, "temperature": 0}
    r = client.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"]
    meta = native(generate, {"input_ids": tokenize(CHAT), "sampling_params": {"temperature": 0, "max_new_tokens": 6}}, 2)
    assert [e["token"] for e in content] == [t[2] for t in meta["output_token_logprobs"]]
    assert [e["logprob"] for e in content] == pytest.approx([t[0] for t in meta["output_token_logprobs"]], abs=1e-5)
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)
    plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert plain["logprobs"] is None
    assert "".join(e["token"] for e in content).startswith(plain["message"]["content"])


def stream_choices(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e)["choices"][0] for e in events[:-1]]


def test_streamed_logprobs_add_up_to_the_whole(client):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    parts = [c["logprobs"] for c in stream_choices(client, "/v1/completions", body) if c["logprobs"]]
    assert sum((p["tokens"] for p in parts), []) == whole["tokens"]
    assert sum((p["text_offset"] for p in parts), []) == whole["text_offset"]
    assert sum((p["token_logprobs"] for p in parts), []) == pytest.approx(whole["token_logprobs"], abs=1e-5)
    chat = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 6, "temperature": 0, "logprobs": True}
    whole = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
    parts = [c["logprobs"]["content"] for c in stream_choices(client, "/v1/chat/completions", chat) if c.get("logprobs")]
    assert [e["token"] for e in sum(parts, [])] == [e["token"] for e in whole]


@pytest.mark.parametrize(
    "path,body,needle",
    [
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs must be in [0, 20], got 21."),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs needs logprobs set to true."),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": -1}, "top_logprobs must be in [0, 20], got -1."),
    ],
)
def test_bad_logprob_options_are_400(client, path, body, needle):
    r = client.post(path, json=body)
    assert r.status_code == 400
    assert r.json()["message"] == needle and r.json()["object"] == "error"
