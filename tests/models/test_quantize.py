"""Quantized SmolLM2: the GGUF's Q4_1 weights packed as they are (the same function as transformers' de-quantized
model), and the perplexity of a fixed public-domain text (tests/data/alice.txt) in each format."""

from pathlib import Path

import pytest
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.models.gguf_q4 import GGUFQ4_1, load_q4_1
from kiln.models.loader import default_model_path, load_model, quantize_model, read_config, resolve_checkpoint
from kiln.ops.quant_linear import Int4Linear, Int8Linear
from kiln.ops.act_int8_linear import W4A8Linear, unpack_int4
from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

TEXT = Path(__file__).parents[1] / "data" / "alice.txt"


@pytest.fixture(scope="module")
def folder() -> Path:
    return resolve_checkpoint(None, Path.home() / ".cache" / "kiln")


@pytest.fixture(scope="module")
def hf(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def load(folder: Path, dtype: torch.dtype, mode: str) -> torch.nn.Module:
    cfg = read_config(folder)
    model = load_model(folder, cfg, dtype, torch.device("cpu"))
    if mode != "none":
        quantize_model(model, cfg, mode, dtype, GGUFQ4_1(default_model_path()))
    return model


def logits(model: torch.nn.Module, ids: list[int], kv_pool, dtype: torch.dtype) -> torch.Tensor:
    """Every position's logits for one prompt run as a single prefill."""
    cfg = model.cfg
    pool = kv_pool(cfg, 1)
    pool.table = torch.arange(1, len(ids) + 1, dtype=torch.int32)[None]
    shape = (cfg.num_hidden_layers, len(ids) + 1, cfg.num_key_value_heads, cfg.head_dim)
    pool.kv = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), pool.kv, pool.meta([0], [0], [len(ids)])))


def test_q4_1_projections_are_the_gguf_weights_exactly(folder):
    cfg = read_config(folder)
    model = load_model(folder, cfg, torch.float32, torch.device("cpu"))
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if name.endswith("_proj")}
    assert load_q4_1(model, GGUFQ4_1(default_model_path()), cfg, torch.float32) == 4 * cfg.num_hidden_layers
    last = cfg.num_hidden_layers - 1
    for name, want in dense.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Int4Linear) and layer.group_size == 32
        if name.startswith(("layers.0.", f"layers.{last}.")):  # every layer is read alike; the float32 kernel is slow
            # The packed layer applied to the identity is its weight: bit for bit what transformers de-quantized.
            assert torch.equal(layer(torch.eye(layer.in_features)).t(), want), name


def test_8da4w_layers_hold_the_gguf_blocks_exactly(folder):
    cfg = read_config(folder)
    model = load_model(folder, cfg, torch.float32, torch.device("cpu"))
    dense = {name: m.weight.detach().clone() for name, m in model.named_modules() if name.endswith("_proj")}
    formats = quantize_model(model, cfg, "8da4w-32", torch.bfloat16, GGUFQ4_1(default_model_path()))
    assert formats == {"8da4w-32 (GGUF Q4_1)": 4 * cfg.num_hidden_layers, "int8dq": 1}
    for name, want in dense.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, W4A8Linear)
        q, d, m = unpack_int4(layer.weights, layer.dm, layer.out_features)
        # d * q + m in float32 is how transformers de-quantizes a Q4_1 block.
        w = (q.float().view(q.shape[0], -1, 32) * d[..., None] + m[..., None]).view(q.shape)
        assert torch.equal(w, want), name


@pytest.mark.parametrize("dense_from_rows", [0, 32], ids=["packed", "float32-copies"])
def test_packed_q4_1_computes_transformers_function(folder, hf, kv_pool, dense_from_rows):
    """Over 32 tokens, so that with `dense_from_rows` 32 the prompt runs on the float32 copies."""
    cfg = read_config(folder)
    model = load_model(folder, cfg, torch.float32, torch.device("cpu"))
    load_q4_1(model, GGUFQ4_1(default_model_path()), cfg, torch.float32, dense_from_rows=dense_from_rows)  # projections; dense head
    text = "The rabbit-hole went straight on like a tunnel for some way, and then dipped suddenly down, so suddenly that Alice had not a moment to think about stopping herself before"
    ids = AutoTokenizer.from_pretrained(folder)(text).input_ids
    assert len(ids) >= 32
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits(model, ids, kv_pool, torch.float32), want, atol=2e-4, rtol=1e-4)


def test_default_int4_server_gives_transformers_greedy_tokens(folder, hf):
    """The whole int4wo-32 configuration (Q4_1 projections, int8 head) in float32 activations, through the engine."""
    core = EngineCore(ServerArgs(dtype="float32", torchao_config="int4wo-32", max_total_tokens=2048, disable_compile=True))
    assert core.engine_info().quantization == {"mode": "int4wo-32", "layers": {"int4wo-32 (GGUF Q4_1)": 120, "int8wo": 1}, "dense_from_rows": 0}
    assert isinstance(core.model.lm_head, Int8Linear) and not isinstance(core.model.embed_tokens, Int8Linear)
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = ["The capital of France is", "def fibonacci(n):", "Alice was beginning to get very tired of"]
    steps = 24
    want = {}
    for i, text in enumerate(prompts):
        ids = tok(text).input_ids
        core.add(GenerateRequest(str(i), ids, SamplingParams(temperature=0, max_new_tokens=steps, ignore_eos=True)))
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=2)
        want[str(i)] = out[0, len(ids) :].tolist()
    got: dict[str, list[int]] = {}
    while core.has_work:
        for o in core.step():
            got.setdefault(o.rid, []).extend(o.new_ids)
    assert got == want


def test_perplexity_of_each_format(folder, kv_pool):
    ids = AutoTokenizer.from_pretrained(folder)(TEXT.read_text()).input_ids
    assert len(ids) > 500

    def perplexity(dtype: torch.dtype, mode: str) -> float:
        out = logits(load(folder, dtype, mode), ids, kv_pool, dtype)
        return torch.nn.functional.cross_entropy(out[:-1].float(), torch.tensor(ids[1:])).exp().item()

    reference = perplexity(torch.float32, "none")
    assert 22.0 < reference < 23.5  # measured 22.65 (SmolLM2-135M-Instruct, the Q4_1 GGUF de-quantized)
    # Measured 2026-11-30: bf16 22.62, int8wo 22.80, int4wo-32 from the GGUF 22.76, int4wo-128 from dense 27.2;
    # 2026-12-01, with the activations rounded to int8 as well: 8da4w-32 from the GGUF 22.89, int8dq 22.78.
    for dtype, mode, worst in [
        (torch.bfloat16, "none", 1.01),
        (torch.bfloat16, "int8wo", 1.02),
        (torch.bfloat16, "int4wo-32", 1.02),
        (torch.bfloat16, "int4wo-128", 1.35),
        (torch.bfloat16, "8da4w-32", 1.025),
        (torch.bfloat16, "int8dq", 1.025),
    ]:
        got = perplexity(dtype, mode)
        assert got < reference * worst, (dtype, mode, got, reference)


def test_unknown_modes_and_updates_of_quantized_weights_are_refused(folder):
    with pytest.raises(ValueError, match="--torchao-config 'int3wo' is not supported; use int8wo, int4wo-32"):
        EngineCore(ServerArgs(torchao_config="int3wo", disable_compile=True, max_total_tokens=256))
    core = EngineCore(ServerArgs(torchao_config="int8wo", disable_compile=True, max_total_tokens=256))
    assert core.dtype == torch.bfloat16  # quantized linears take bfloat16 activations unless --dtype says otherwise
    ok, message = core.weights.update(str(folder), None)
    assert not ok and "the served linears are quantized (int8wo); start the server with --torchao-config none" in message


def test_the_q4_1_blocks_cache_holds_the_gguf_tensors(tmp_path):
    cache = tmp_path / "q4_1.blocks"
    parsed = GGUFQ4_1(default_model_path(), cache).tensors
    cached = GGUFQ4_1(tmp_path / "absent.gguf", cache).tensors  # the file is not read again
    assert len(parsed) == 30 * 7 and parsed.keys() == cached.keys()
    assert all(np.array_equal(parsed[name], cached[name]) for name in parsed)
