"""Health, model/server info, tokenizer endpoints, /v1/models and /flush_cache."""

import pytest

MODEL_INFO_KEYS = {
    "model_path", "tokenizer_path", "is_generation", "preferred_sampling_params", "weight_version",
    "has_image_understanding", "has_audio_understanding", "model_type", "architectures",
}  # fmt: skip

FLUSH_MESSAGE = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)

ROUND_TRIP_TEXT = "SGLang provides efficient tokenization endpoints."


def test_health(client):
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.content == b""


def test_health_generate(client):
    resp = client.get("/health_generate")
    assert resp.status_code == 200
    assert resp.content == b""


@pytest.mark.parametrize("path", ["/get_model_info", "/model_info"])
def test_model_info(client, path):
    resp = client.get(path)
    assert resp.status_code == 200
    info = resp.json()
    assert set(info) == MODEL_INFO_KEYS
    assert info["is_generation"] is True
    assert info["model_type"] == "llama"
    assert info["architectures"] == ["LlamaForCausalLM"]
    assert info["preferred_sampling_params"] is None
    assert info["weight_version"] == "default"
    assert info["has_image_understanding"] is False
    assert info["has_audio_understanding"] is False
    assert isinstance(info["model_path"], str) and info["model_path"]
    assert info["tokenizer_path"] == info["model_path"]


def test_model_info_aliases_agree(client):
    assert client.get("/get_model_info").json() == client.get("/model_info").json()


@pytest.mark.parametrize("path", ["/get_server_info", "/server_info"])
def test_server_info(client, server_port, path):
    resp = client.get(path)
    assert resp.status_code == 200
    info = resp.json()
    # resolved server arguments
    assert info["port"] == server_port
    assert info["host"] == "127.0.0.1"
    assert info["dtype"] == "float32"
    assert info["max_total_tokens"] == 8192
    assert info["weight_version"] == "default"
    assert "model_path" in info and "tokenizer_path" in info
    # the scheduler's figures
    assert info["max_total_num_tokens"] == 8192
    assert info["max_running_requests"] == 32
    assert isinstance(info["max_req_input_len"], int) and 0 < info["max_req_input_len"] <= 8192
    assert isinstance(info["internal_states"], list) and len(info["internal_states"]) == 1
    assert isinstance(info["internal_states"][0], dict)
    assert isinstance(info["version"], str) and info["version"]


def test_server_info_aliases_agree(client):
    a, b = client.get("/get_server_info").json(), client.get("/server_info").json()
    assert set(a) == set(b)
    volatile = {
        "internal_states", "num_running_reqs", "num_waiting_reqs", "free_slots", "available_slots", "cached_tokens_in_tree",
        "num_used_tokens", "token_usage", "cache_hit_rate", "gen_throughput", "num_retracted_reqs",
    }  # fmt: skip
    assert {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}


def test_tokenize_detokenize_round_trip(client):
    resp = client.post("/tokenize", json={"model": "ignored", "prompt": ROUND_TRIP_TEXT, "add_special_tokens": False})
    assert resp.status_code == 200
    out = resp.json()
    assert set(out) == {"tokens", "count", "max_model_len"}
    tokens = out["tokens"]
    assert tokens and all(type(t) is int for t in tokens)
    assert out["count"] == len(tokens)
    assert out["max_model_len"] == 8192
    resp = client.post("/detokenize", json={"model": "ignored", "tokens": tokens, "skip_special_tokens": True})
    assert resp.status_code == 200
    assert resp.json() == {"text": ROUND_TRIP_TEXT}


def test_tokenize_count_matches_generate_prompt_tokens(client, generate):
    out = client.post("/tokenize", json={"prompt": "Once upon a time, in a land far away"}).json()
    res = generate({"text": "Once upon a time, in a land far away", "sampling_params": {"max_new_tokens": 0}})
    assert res["meta_info"]["prompt_tokens"] == out["count"]
    same = generate({"input_ids": out["tokens"], "sampling_params": {"max_new_tokens": 0}})
    assert same["meta_info"]["prompt_tokens"] == out["count"]


def test_tokenize_detokenize_lists(client):
    texts = ["Hello world", "a", "The quick brown fox jumps over the lazy dog.", "Grüße, 世界! 🎉"]
    out = client.post("/tokenize", json={"prompt": texts, "add_special_tokens": False}).json()
    assert isinstance(out["tokens"], list) and len(out["tokens"]) == len(texts)
    assert out["count"] == [len(t) for t in out["tokens"]]
    assert all(c > 0 for c in out["count"])
    assert out["max_model_len"] == 8192
    singles = [client.post("/tokenize", json={"prompt": t, "add_special_tokens": False}).json()["tokens"] for t in texts]
    assert out["tokens"] == singles
    back = client.post("/detokenize", json={"tokens": out["tokens"]}).json()
    assert back == {"text": texts}


def test_detokenize_special_tokens(client):
    ids = client.post("/tokenize", json={"prompt": "<|im_start|>hi<|im_end|>", "add_special_tokens": False}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": ids, "skip_special_tokens": False}).json()["text"] == "<|im_start|>hi<|im_end|>"
    assert client.post("/detokenize", json={"tokens": ids}).json()["text"] == "hi"


def test_v1_models(client):
    resp = client.get("/v1/models")
    assert resp.status_code == 200
    out = resp.json()
    assert out["object"] == "list"
    assert len(out["data"]) == 1
    card = out["data"][0]
    model_path = client.get("/model_info").json()["model_path"]
    assert card["id"] == model_path  # no --served-model-name: the model path
    assert card["object"] == "model"
    assert card["root"] == model_path
    assert card["max_model_len"] == 8192
    assert isinstance(card["created"], int) and card["created"] > 0
    assert isinstance(card["owned_by"], str)


def test_flush_cache_idle(client, wait_idle):
    wait_idle()
    resp = client.post("/flush_cache")
    assert resp.status_code == 200
    assert resp.text == FLUSH_MESSAGE


def test_flush_cache_is_post_only(client):
    """A GET must not change state: a page's <img src> could otherwise flush the cache."""
    resp = client.get("/flush_cache")
    assert resp.status_code == 405
    assert "error" in resp.json()
