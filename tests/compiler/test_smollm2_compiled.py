"""SmolLM2 (real weights, float32): the compiled engine gives the eager engine's greedy tokens, with the smallest
decode bucket's pieces built with Inductor's C++ wrapper and the others with its Python wrapper."""

from transformers import AutoTokenizer

from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

PROFILE = """
[buckets]
decode_batch_sizes = [2, 4]
prefill_token_counts = [64]
chunked_prefill_size = 64
[inductor]
[small_buckets]
max_tokens = 2
inductor = { cpp_wrapper = true }
"""
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sea salty?"]


def greedy(core: EngineCore, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_new_tokens=16)
    for i, ids in enumerate(prompts):
        core.add(GenerateRequest(str(i), ids, params))
    out: dict[str, list[int]] = {}
    while core.has_work:
        for o in core.step():
            out.setdefault(o.rid, []).extend(o.new_ids)
    return [out[str(i)] for i in range(len(prompts))]


def test_compiled_equals_eager(tmp_path):
    (tmp_path / "profile.toml").write_text(PROFILE)
    common = dict(dtype="float32", max_total_tokens=2048, max_running_requests=4, disable_radix_cache=True)
    eager = EngineCore(ServerArgs(**common, disable_compile=True))
    tok = AutoTokenizer.from_pretrained(eager.checkpoint)
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False) for q in QUESTIONS]
    prompts = [tok(c).input_ids for c in chats]
    want = greedy(eager, prompts)
    del eager
    compiled = EngineCore(ServerArgs(**common, profile=str(tmp_path / "profile.toml"), compile_cache_dir=str(tmp_path / "cache")))
    assert greedy(compiled, prompts) == want
    assert [greedy(compiled, [p])[0] for p in prompts] == want
    counters = compiled.stats().compile
    assert counters["recompiles"] == 0 and counters["buckets_compiled"] == 3
