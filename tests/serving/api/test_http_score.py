"""/v1/score on SmolLM2 against the softmax of transformers' next-token logits (float32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

QUERY = "Is Paris the capital of France? Answer:"
ITEMS = [" Yes", " No", " Maybe so"]


@pytest.fixture(scope="module")
def next_token_probs(client):
    folder = client.get("/get_server_info").json()["checkpoint"]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(hf(torch.tensor([ids])).logits[0, -1], dim=-1)

    return probs


@pytest.fixture(scope="module")
def labels(tokenize) -> list[int]:
    return [tokenize(" yes")[0], tokenize(" no")[0], tokenize(" the")[0]]


@pytest.mark.parametrize("item_first", [False, True])
def test_score_matches_transformers(client, tokenize, next_token_probs, labels, item_first):
    body = {"query": QUERY, "items": ITEMS, "label_token_ids": labels, "item_first": item_first, "model": "m"}
    plain = client.post("/v1/score", json=body)
    soft = client.post("/v1/score", json={**body, "apply_softmax": True})
    assert plain.status_code == soft.status_code == 200, plain.text + soft.text
    assert plain.json()["object"] == "scoring" and plain.json()["model"] == "m"
    for item, p, s in zip(ITEMS, plain.json()["scores"], soft.json()["scores"]):
        ids = tokenize(item + QUERY if item_first else QUERY + item)
        want = next_token_probs(ids)[labels]
        torch.testing.assert_close(torch.tensor(p), want, atol=1e-5, rtol=1e-3)
        torch.testing.assert_close(torch.tensor(s), want / want.sum(), atol=1e-5, rtol=1e-3)
    total = sum(len(tokenize(i + QUERY if item_first else QUERY + i)) for i in ITEMS)
    assert plain.json()["usage"]["prompt_tokens"] == total


def test_score_with_token_ids(client, tokenize, next_token_probs, labels):
    query, items = tokenize(QUERY), [tokenize(i) for i in ITEMS[:2]]
    r = client.post("/v1/score", json={"query": query, "items": items, "label_token_ids": labels})
    assert r.status_code == 200, r.text
    for item, got in zip(items, r.json()["scores"]):
        torch.testing.assert_close(torch.tensor(got), next_token_probs(query + item)[labels], atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"query": "q", "items": ["i"], "label_token_ids": []}, "label_token_ids must be a non-empty list"),
        ({"query": "q", "items": ["i"], "label_token_ids": [10**9]}, "Token ID 1000000000 is out of vocabulary (vocab size: 49152)"),
        ({"query": "q", "items": [[1, 2]], "label_token_ids": [1]}, "With a text query, items must be text too"),
        ({"items": ["i"], "label_token_ids": [1]}, "query and items are both required"),
    ],
)
def test_bad_score_input_is_a_400(client, body, needle):
    r = client.post("/v1/score", json=body)
    assert r.status_code == 400 and needle in r.json()["message"], r.text


@pytest.mark.parametrize("path", ["/encode", "/v1/embeddings", "/classify", "/v1/rerank"])
def test_pooled_endpoints_on_a_generation_model_are_a_400(client, path):
    body = {"query": "q", "documents": ["d"]} if path == "/v1/rerank" else {"input": "hi"} if path == "/v1/embeddings" else {"text": "hi"}
    r = client.post(path, json=body)
    assert r.status_code == 400
    message = r.json()["message"] if path.startswith("/v1/") else r.json()["error"]["message"]
    assert message.startswith(path) and message.endswith("the loaded model is a generation model.")


def test_no_items_score_nothing(client):
    r = client.post("/v1/score", json={"query": "q", "items": [], "label_token_ids": [1]})
    assert r.status_code == 200 and r.json()["scores"] == [] and r.json()["object"] == "scoring"


def test_a_score_is_the_same_cold_and_from_the_cache(client, labels, wait_idle):
    """float32: the prefix's K/V from the radix cache give the numbers a full computation gives, to 1e-4 (the
    dense GEMM rounds one or two rows differently). The default bfloat16 int4 weights give the same bits: see
    tests/serving/engine/test_prefix_cache_and_pressure.py."""
    body = {"query": "Would you recommend this film to a friend? Review: slow, but the ending stays with you. Answer:", "items": [" Yes"], "label_token_ids": labels}
    wait_idle()
    assert client.post("/flush_cache").status_code == 200
    cold = client.post("/v1/score", json=body).json()["scores"][0]
    assert client.get("/get_server_info").json()["cached_tokens_in_tree"] > 0
    warm = client.post("/v1/score", json=body).json()["scores"][0]
    torch.testing.assert_close(torch.tensor(warm), torch.tensor(cold), rtol=1e-4, atol=1e-9)
