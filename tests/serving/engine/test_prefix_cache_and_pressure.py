"""SmolLM2 end to end in the engine: prefix reuse, chunked prefill and retraction change no greedy token."""

import pytest

from kiln.ops.act_int8_linear import has_kernel
from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

SYSTEM = [100 + (i * 37) % 3000 for i in range(60)]  # a shared 60-token "system prompt"
PROMPTS = [SYSTEM + [4000 + i, 4100 + i, 4200 + 2 * i] for i in range(6)]
NEW = 12


def engine(**kw) -> EngineCore:
    return EngineCore(ServerArgs(dtype="float32", disable_compile=True, max_running_requests=6, **kw))


def run(core: EngineCore, prompts: list[list[int]]) -> dict[str, dict]:
    params = SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True)
    for i, ids in enumerate(prompts):
        core.add(GenerateRequest(str(i), ids, params))
    out: dict[str, dict] = {}
    while core.has_work:
        for o in core.step():
            got = out.setdefault(o.rid, {"ids": [], "cached": 0, "retractions": 0})
            got["ids"] += o.new_ids
            got["cached"], got["retractions"] = o.cached_tokens, o.retractions
    return out


@pytest.fixture(scope="module")
def reference():
    """Each prompt alone, no cache, ample memory."""
    core = engine(max_total_tokens=4096, disable_radix_cache=True)
    return [run(core, [p])["0"]["ids"] for p in PROMPTS]


def test_shared_prefix_is_reused_without_changing_outputs(reference):
    core = engine(max_total_tokens=4096)
    first = run(core, PROMPTS[:1])
    rest = run(core, PROMPTS[1:])
    assert first["0"]["cached"] == 0
    assert all(r["cached"] >= len(SYSTEM) for r in rest.values())
    assert [first["0"]["ids"]] + [rest[str(i)]["ids"] for i in range(5)] == reference
    assert core.scheduler.available() == core.pool.size


def test_chunked_prefill_gives_the_same_tokens(reference):
    core = engine(max_total_tokens=4096, chunked_prefill_size=16, disable_radix_cache=True)
    out = run(core, PROMPTS)
    assert [out[str(i)]["ids"] for i in range(6)] == reference


def test_a_tiny_pool_forces_retraction_and_loses_nothing(reference):
    # 6 requests of 75 tokens each in a pool of 200: admission reserves no output, so decode must retract.
    core = engine(max_total_tokens=200, schedule_conservativeness=0.0, disable_radix_cache=True)
    out = run(core, PROMPTS)
    assert core.scheduler.total_retractions > 0
    assert [out[str(i)]["ids"] for i in range(6)] == reference
    assert core.pool.free_slots == core.pool.size


def test_flush_cache_empties_the_tree_only_when_idle():
    core = engine(max_total_tokens=4096)
    run(core, PROMPTS[:2])
    assert core.scheduler.cache.total_size() > 0
    core.add(GenerateRequest("w", PROMPTS[0], SamplingParams(max_new_tokens=1)))
    assert core.flush_cache() is False and core.scheduler.cache.total_size() > 0
    while core.has_work:
        core.step()
    assert core.flush_cache() is True
    assert core.scheduler.cache.total_size() == 0 and core.pool.free_slots == core.pool.size
    assert run(core, PROMPTS[:1])["0"]["cached"] == 0


def test_input_logprobs_are_the_same_across_prefill_chunks():
    from kiln.serving.messages import LogprobRequest

    def input_logprobs(core: EngineCore) -> list:
        core.add(GenerateRequest("lp", PROMPTS[0], SamplingParams(max_new_tokens=0), LogprobRequest(top_n=2, start_len=5)))
        outs = []
        while core.has_work:
            outs += core.step()
        return [o for o in outs if o.input_logprobs is not None]

    whole = input_logprobs(engine(max_total_tokens=4096))
    chunked = input_logprobs(engine(max_total_tokens=4096, chunked_prefill_size=16))
    assert len(whole) == len(chunked) == 1
    assert len(whole[0].input_logprobs) == len(PROMPTS[0]) - 5
    assert [t for top in chunked[0].input_top_logprobs for _, t in top] == [t for top in whole[0].input_top_logprobs for _, t in top]
    assert chunked[0].input_logprobs == pytest.approx(whole[0].input_logprobs, abs=1e-4)


def test_bfloat16_scores_are_the_same_bits_cold_cached_and_chunked():
    """What /v1/score asks (one greedy token, the label ids' logprobs), with the default weights (bfloat16, the
    GGUF's int4, against int8 activations where the CPU has AVX512-VNNI): the same bits whether the prompt was computed now, came from the radix cache (after itself
    or after another prompt sharing its prefix), or ran in chunks."""
    from kiln.serving.messages import LogprobRequest

    labels = [9, 4000, 4100]

    def score(core: EngineCore, prompt: list[int]) -> list[list[tuple[float, int]]]:
        core.add(GenerateRequest("s", prompt, SamplingParams(max_new_tokens=1, temperature=0), LogprobRequest(token_ids=labels)))
        outs = []
        while core.has_work:
            outs += core.step()
        return [o for o in outs if o.ids_logprobs][0].ids_logprobs

    def bf16_engine(**kw) -> EngineCore:
        return EngineCore(ServerArgs(dtype="bfloat16", disable_compile=True, max_running_requests=6, max_total_tokens=4096, **kw))

    core = bf16_engine()
    mode = core.engine_info().quantization["mode"]
    assert mode == ("8da4w-32" if has_kernel() else "int4wo-32")  # row by row either way
    assert core.quantized_layers.get(f"{mode} (GGUF Q4_1)", 0) > 0
    cold = score(core, PROMPTS[0])
    assert core.scheduler.cache.total_size() > 0
    assert score(core, PROMPTS[0]) == cold  # all but its last tokens cached
    primed = bf16_engine()
    score(primed, PROMPTS[1])
    assert score(primed, PROMPTS[0]) == cold  # the prefix another prompt left
    assert score(bf16_engine(chunked_prefill_size=16, disable_radix_cache=True), PROMPTS[0]) == cold
