"""kiln.Engine, the offline API the README shows: the same answers as the engine core driven directly."""

import kiln
from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

ARGS = dict(dtype="float32", disable_compile=True, max_total_tokens=2048)


def test_offline_generate_gives_the_engines_greedy_tokens():
    prompts = ["The capital of France is", "1, 2, 3,"]
    params = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    with kiln.Engine(**ARGS) as engine:
        single = engine.generate(prompts[0], params)
        batch = engine.generate(prompts, params)
    core = EngineCore(ServerArgs(**ARGS))
    for i, prompt in enumerate(prompts):
        core.add(GenerateRequest(str(i), core.tokenizer.encode(prompt), SamplingParams(**params)))
    outputs: dict[str, list[int]] = {}
    while core.has_work:
        for o in core.step():
            outputs.setdefault(o.rid, []).extend(o.new_ids)
    expected = [outputs[str(i)] for i in range(len(prompts))]
    assert single["output_ids"] == expected[0]
    assert [r["output_ids"] for r in batch] == expected
    assert single["text"] == core.tokenizer.decode(expected[0]) and single["meta_info"]["completion_tokens"] == 6
