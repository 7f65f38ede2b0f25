"""SmolLM2-135M (real weights) greedy decoding, token for token against transformers, in float32."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

NEW_TOKENS = 24
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
]


@pytest.fixture(scope="module")
def core():
    return EngineCore(ServerArgs(dtype="float32", max_total_tokens=4096, max_running_requests=8, disable_compile=True))


@pytest.fixture(scope="module")
def prompts(core):
    tok = AutoTokenizer.from_pretrained(core.checkpoint)
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False) for q in QUESTIONS]
    return [tok(c).input_ids for c in chats] + [tok("The capital of France is").input_ids]


@pytest.fixture(scope="module")
def expected(core, prompts):
    hf = AutoModelForCausalLM.from_pretrained(core.checkpoint, dtype=torch.float32).eval()
    outs = []
    for ids in prompts:
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2, pad_token_id=2)
        outs.append(gen[0, len(ids) :].tolist())
    return outs


def run(core: EngineCore, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS)
    got: dict[str, list[int]] = {}
    for i, ids in enumerate(prompts):
        core.add(GenerateRequest(str(i), ids, params))
    while core.has_work:
        for out in core.step():
            got.setdefault(out.rid, []).extend(out.new_ids)
    return [got[str(i)] for i in range(len(prompts))]


def test_each_prompt_alone_matches_transformers(core, prompts, expected):
    for ids, want in zip(prompts, expected):
        assert run(core, [ids]) == [want]


def test_batched_together_matches_transformers(core, prompts, expected):
    assert run(core, prompts) == expected
    assert core.scheduler.available() == core.pool.size, "every slot is free or held only by the radix cache"


def test_late_joiners_do_not_change_running_requests(core, prompts, expected):
    """Requests admitted while others are mid-decode (continuous batching) give the same tokens."""
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS)
    got: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or core.has_work:
        if pending:
            i, ids = pending.pop(0)
            core.add(GenerateRequest(str(i), ids, params))
        for out in core.step():
            got.setdefault(out.rid, []).extend(out.new_ids)
    assert [got[str(i)] for i in range(len(prompts))] == expected
