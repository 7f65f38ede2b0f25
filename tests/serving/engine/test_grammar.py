"""Grammars in the engine: compiler messages, the bitmask touches constrained rows only, retraction keeps matchers in step."""

import json
import re

import pytest
import torch
import xgrammar as xgr

from kiln.serving.engine.core import EngineCore
from kiln.serving.engine.grammar import GrammarCompiler, GrammarError, grammar_key
from kiln.serving.engine.grammar_mask import GrammarMask
from kiln.serving.messages import FinishAbort, FinishLength, FinishStop, GenerateRequest
from kiln.serving.engine.request import Req
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}}, "required": ["name", "age"]})


@pytest.fixture(scope="module")
def core() -> EngineCore:
    # A pool of 200 tokens for 6 prompts of about 60: admission reserves no output, so decode must retract.
    return EngineCore(ServerArgs(dtype="float32", disable_compile=True, max_running_requests=6, max_total_tokens=200, schedule_conservativeness=0.0, disable_radix_cache=True))


def test_grammar_key_and_compiler_messages(core):
    assert grammar_key(SamplingParams()) is None
    assert grammar_key(SamplingParams(regex="a+")) == ("regex", "a+")
    compiler = GrammarCompiler(core.tokenizer, core.cfg.vocab_size, core.eos_ids, any_whitespace=True)
    with pytest.raises(GrammarError) as info:
        compiler.compile(("regex", "[a-")).result()
    assert str(info.value).startswith("Invalid regex: Regex parsing error")
    compiler.compile(("json_schema", "$$ANY$$")).result()


def test_the_mask_touches_only_constrained_rows(core):
    compiler = GrammarCompiler(core.tokenizer, core.cfg.vocab_size, core.eos_ids, any_whitespace=True)
    reqs = [Req("free", [1], SamplingParams(), 0), Req("digits", [1], SamplingParams(), 0)]
    reqs[1].grammar = xgr.GrammarMatcher(compiler.compile(("regex", "[0-9]+")).result())
    logits = torch.randn(2, core.cfg.vocab_size)
    before = logits.clone()
    mask = GrammarMask(core.cfg.vocab_size, 4)
    mask.apply(logits, mask.start(reqs))
    assert torch.equal(logits[0], before[0])
    allowed = torch.nonzero(logits[1] > float("-inf")).flatten().tolist()
    assert allowed and all(re.fullmatch("[0-9]+", core.tokenizer.decode([t])) for t in allowed)
    assert torch.equal(logits[1, allowed], before[1, allowed])
    assert compiler.compile(("regex", "[0-9]+")) is compiler.compile(("regex", "[0-9]+"))  # compiled once


def run(core: EngineCore, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, dict]:
    for i, (ids, p) in enumerate(zip(prompts, params)):
        core.add(GenerateRequest(str(i), ids, p))
    out: dict[str, dict] = {}
    while core.has_work:
        for o in core.step():
            got = out.setdefault(o.rid, {"ids": [], "finish": None})
            got["ids"] += o.new_ids
            got["finish"] = o.finish_reason
    return out


def test_retracted_constrained_requests_resume_their_grammar(core):
    chat = core.tokenizer.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}], add_generation_prompt=True, tokenize=False)
    base = core.tokenizer(chat).input_ids
    prompts = [[100 + 7 * i] + base for i in range(6)]
    params = [SamplingParams(temperature=0, max_new_tokens=24, json_schema=SCHEMA) if i % 2 == 0 else SamplingParams(temperature=0, max_new_tokens=24, regex="[a-z]+ [0-9]{1,3}") for i in range(6)]
    alone = [run(core, [p], [sp])["0"] for p, sp in zip(prompts, params)]
    assert core.scheduler.total_retractions == 0
    together = run(core, prompts, params)
    assert core.scheduler.total_retractions > 0
    assert [together[str(i)] for i in range(6)] == alone
    assert all(isinstance(r["finish"], (FinishStop, FinishLength)) for r in alone)
    assert core.pool.free_slots == core.pool.size


def test_abort_of_queued_running_and_compiling_requests(core):
    p = SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True)
    for i in range(7):  # one more than max_running_requests: r6 waits
        core.add(GenerateRequest(f"r{i}", [1, 2, 3 + i], p))
    core.add(GenerateRequest("g", [1, 2, 3], SamplingParams(max_new_tokens=50, regex="x{1,40}y")))
    core.step()
    core.step()
    assert {r.rid for r in core.scheduler.running} == {f"r{i}" for i in range(6)}
    queued = {o.rid: o.finish_reason for o in core.abort("r6")}
    assert queued == {"r6": FinishAbort("Abort before prefill")}
    running = {o.rid: o for o in core.abort("r0")}
    assert running["r0"].finish_reason == FinishAbort("Abort in decode")
    rest = {o.rid: type(o.finish_reason).__name__ for o in core.abort("")}
    assert rest == {rid: "FinishAbort" for rid in ["r1", "r2", "r3", "r4", "r5", "g"]}
    assert not core.has_work and core.pool.free_slots == core.pool.size
