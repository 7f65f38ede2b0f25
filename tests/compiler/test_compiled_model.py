"""The compiled engine: same greedy tokens as eager, and no recompiles under a random mixed workload."""

from pathlib import Path

import pytest
import torch
import torch._dynamo.package
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kiln.compiler.piecewise import RecompileError
from kiln.models.loader import resolve_checkpoint
from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import FinishAbort, GenerateRequest, UpdateWeights
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

PROFILE = """
[buckets]
decode_batch_sizes = [1, 2, 4]
prefill_token_counts = [16, 64]
chunked_prefill_size = 64
[inductor]
"""


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    # The engine loads a tokenizer with the model; any will do for id-level tests.
    AutoTokenizer.from_pretrained(resolve_checkpoint(None, Path.home() / ".cache" / "kiln")).save_pretrained(root / "model")
    (root / "profile.toml").write_text(PROFILE)
    common = dict(model_path=str(root / "model"), tokenizer_path=None, dtype="float32", max_total_tokens=2048, max_running_requests=6)
    eager = EngineCore(ServerArgs(**common, disable_compile=True))
    compiled = EngineCore(ServerArgs(**common, profile=str(root / "profile.toml"), compile_cache_dir=str(root / "cache")))
    return eager, compiled


def test_a_warm_start_serves_from_the_saved_trace(engines, monkeypatch):
    """A second engine on the same cache folder loads Dynamo's trace and every piece instead of compiling,
    and serves the same tokens. It builds none of the trace's guards (their checks are off)."""
    eager, compiled = engines

    def no_guards(*args, **kwargs):
        raise AssertionError("the saved trace's guards were built")

    monkeypatch.setattr(torch._dynamo.package, "load_guard_manager", no_guards)
    warm = EngineCore(compiled.args)
    counters = warm.stats().compile
    # (The cache counters are the process's, this test's cold engine included: test_warm_start.py checks them.)
    assert counters["trace_loaded"] and counters["cpu_decode_kernels_loaded"] == 1
    wave = [[("a", [5, 6, 7, 8], 5), ("b", list(range(1, 30)), 3)], [("c", [9], 4)]]
    assert drive(warm, wave) == drive(eager, wave)


def drive(core: EngineCore, arrivals: list[list[tuple[str, list[int], int]]]) -> dict[str, list[int]]:
    """Each inner list arrives before one engine step; runs until every request is done."""
    out: dict[str, list[int]] = {}
    pending = list(arrivals)
    while pending or core.has_work:
        for rid, ids, new in pending.pop(0) if pending else []:
            core.add(GenerateRequest(rid, ids, SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)))
        for o in core.step():
            out.setdefault(o.rid, []).extend(o.new_ids)
    return out


workloads = st.lists(
    st.lists(st.tuples(st.lists(st.integers(1, 95), min_size=1, max_size=40), st.integers(1, 6)), max_size=3),
    min_size=1,
    max_size=5,
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(waves=workloads)
def test_random_workload_matches_eager_without_recompiles(engines, waves):
    eager, compiled = engines
    arrivals, n = [], 0
    for wave in waves:
        arrivals.append([(f"r{n + i}", ids, new) for i, (ids, new) in enumerate(wave)])
        n += len(wave)
    assert drive(compiled, arrivals) == drive(eager, arrivals)
    counters = compiled.stats().compile
    assert counters["recompiles"] == 0 and counters["graph_breaks"] == 0
    assert counters["buckets_compiled"] == 5
    assert counters["cpu_decode_kernels"] == 1  # decode reads the pool in place (ops/attention_decode_cpu.py)


def test_an_unwarmed_shape_is_an_error_not_a_recompile(engines):
    _, compiled = engines
    artifacts = compiled.compiled.stats.artifacts
    saved = dict(artifacts)
    artifacts.clear()  # as if this bucket had never been warmed up
    try:
        compiled.add(GenerateRequest("x", [1, 2, 3], SamplingParams(max_new_tokens=1)))
        # The engine survives: the failed forward ends its batch's requests with the compiler's error.
        (out,) = compiled.step()
        assert isinstance(out.finish_reason, FinishAbort)
        assert RecompileError.__name__ in out.finish_reason.message and "not padded to a warmed-up bucket" in out.finish_reason.message
    finally:
        artifacts.update(saved)
        compiled.abort("")
    assert drive(compiled, [[("y", [1, 2, 3], 2)]])["y"]


def test_weights_updated_in_place_keep_every_compiled_bucket(engines, tmp_path):
    """The update copies into the parameters' storage: the compiled pieces serve the new weights as they are."""
    eager, compiled = engines
    original = compiled.checkpoint
    torch.manual_seed(1)
    LlamaForCausalLM.from_pretrained(original).apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None).save_pretrained(tmp_path)
    before = compiled.stats().compile
    wave = [[("u0", [1, 2, 3, 4, 5], 6), ("u1", list(range(10, 40)), 6), ("u2", [7], 6)]]
    old = drive(compiled, wave)
    try:
        for core in engines:
            assert core.update_weights(UpdateWeights(str(tmp_path))).success
        new = drive(compiled, wave)
        assert new == drive(eager, wave) and new != old
    finally:
        for core in engines:
            assert core.update_weights(UpdateWeights(str(original))).success
    assert drive(compiled, wave) == old
    after = compiled.stats().compile
    for key in ("recompiles", "piece_compiles", "cache_misses", "eager_fallbacks", "graph_breaks"):
        assert after[key] == before[key], key


@pytest.fixture(scope="module")
def gemma_engines(tmp_path_factory):
    """A tiny Gemma 3 whose sliding window (8 tokens) every test prompt outgrows, eager and compiled."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    root = tmp_path_factory.mktemp("gemma")
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=256,
        query_pre_attn_scalar=16,
    )  # fmt: skip
    hf = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.2)  # (1 + w): zeros would test nothing
    hf.save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(resolve_checkpoint(None, Path.home() / ".cache" / "kiln")).save_pretrained(root / "model")
    # Two buckets keep the compile short: any decode batch pads to 4 rows, anything else to 64 tokens.
    (root / "profile.toml").write_text(PROFILE.replace("[1, 2, 4]", "[4]").replace("[16, 64]", "[64]"))
    common = dict(model_path=str(root / "model"), tokenizer_path=None, dtype="float32", max_total_tokens=2048, max_running_requests=6)
    eager = EngineCore(ServerArgs(**common, disable_compile=True))
    compiled = EngineCore(ServerArgs(**common, profile=str(root / "profile.toml"), compile_cache_dir=str(root / "cache")))
    return hf.eval(), eager, compiled


def test_sliding_window_layers_compiled_match_transformers_without_recompiles(gemma_engines):
    hf, eager, compiled = gemma_engines
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 96, (n,), generator=gen).tolist() for n in (3, 9, 23, 40)]
    wave = [[(f"g{i}", ids, 12) for i, ids in enumerate(prompts)]]
    want = {}
    for i, ids in enumerate(prompts):
        # transformers' full forward each step, EOS not banned (the engine runs with ignore_eos, which only
        # keeps going past EOS, where generate's min_new_tokens would forbid it).
        seq = list(ids)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        want[f"g{i}"] = seq[len(ids) :]
    assert drive(eager, wave) == want
    assert drive(compiled, wave) == want
    counters = compiled.stats().compile
    assert counters["recompiles"] == 0 and counters["graph_breaks"] == 0 and counters["eager_fallbacks"] == 0
    assert counters["cpu_decode_kernels"] == 2  # sliding-window and global layers


@pytest.fixture(scope="module")
def moe_engines(tmp_path_factory):
    """A tiny Qwen2-MoE (shared expert, a dense middle layer), eager and compiled."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, mlp_only_layers=[1], max_position_embeddings=256,
    )  # fmt: skip
    hf = Qwen2MoeForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)  # decisive routing
    hf.save_pretrained(root / "model")
    (root / "profile.toml").write_text(PROFILE.replace("[1, 2, 4]", "[4]").replace("[16, 64]", "[64]"))
    common = dict(model_path=str(root / "model"), skip_tokenizer_init=True, dtype="float32", max_total_tokens=2048, max_running_requests=6)
    eager = EngineCore(ServerArgs(**common, disable_compile=True))
    compiled = EngineCore(ServerArgs(**common, profile=str(root / "profile.toml"), compile_cache_dir=str(root / "cache")))
    return eager, compiled


def expert_counts(core: EngineCore) -> list[list[int]]:
    return [layer.mlp.expert_counts.tolist() for layer in core.model.layers if hasattr(layer.mlp, "expert_counts")]


def test_moe_compiled_matches_eager_and_counts_inside_the_graph(moe_engines):
    eager, compiled = moe_engines
    gen = torch.Generator().manual_seed(5)
    waves = [
        [(f"m{i}", torch.randint(1, 96, (n,), generator=gen).tolist(), 10) for i, n in enumerate((3, 17, 40))],
        [("late", torch.randint(1, 96, (9,), generator=gen).tolist(), 6)],
    ]
    for core in (eager, compiled):
        for layer in core.model.layers:
            if hasattr(layer.mlp, "expert_counts"):
                layer.mlp.expert_counts.zero_()
    assert drive(compiled, waves) == drive(eager, waves)
    # Bucket padding (to 4 decode rows, 64 prefill tokens) is neither routed nor counted, compiled or not.
    assert expert_counts(compiled) == expert_counts(eager)
    assert sum(map(sum, expert_counts(eager))) == 2 * 2 * (3 + 17 + 40 + 9 + 3 * 9 + 5)
    counters = compiled.stats().compile
    assert counters["recompiles"] == 0 and counters["graph_breaks"] == 0 and counters["eager_fallbacks"] == 0
