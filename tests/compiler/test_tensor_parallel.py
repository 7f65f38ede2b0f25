"""Compiled tensor parallel on two CPU ranks (gloo): the functional all-reduces sit inside the compiled
pieces, and the compiled ranks give the eager ranks' tokens with no recompile and no graph break."""

import pytest
import torch

from kiln.tests.models.tp_ranks import TINY_PROMPTS, Case, greedy_on_ranks, tiny_qwen2

# One bucket (decode of 2; the prompts' prefill runs eagerly) and one layer (two distinct pieces): the
# ranks compile in parallel on a small machine, and Inductor's C++ builds dominate this test.
PROFILE = """
[buckets]
decode_batch_sizes = [2]
prefill_token_counts = [2]
chunked_prefill_size = 32
[inductor]
"""


@pytest.mark.slow
def test_compiled_tensor_parallel_gives_eager_tokens_without_recompiles(tmp_path):
    folder = tiny_qwen2(tmp_path / "model", 2, tied=False, layers=1)
    cases = {
        "eager": Case(folder, TINY_PROMPTS, 12),
        "compiled": Case(folder, TINY_PROMPTS, 12, profile=PROFILE, compile_cache=tmp_path / "compile"),
    }
    for rank in greedy_on_ranks(cases, 2, tmp_path):
        compiled, eager = rank["compiled"], rank["eager"]
        assert compiled.tokens == eager.tokens
        torch.testing.assert_close(compiled.logits, eager.logits, atol=2e-6, rtol=1e-5)
        counters = compiled.counters
        assert counters["recompiles"] == 0 and counters["graph_breaks"] == 0
        assert counters["buckets_compiled"] == 1 and counters["distinct_pieces"] == 2
        assert counters["eager_fallbacks"] == 1  # the prefill, larger than the one bucket
