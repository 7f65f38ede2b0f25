"""Structured output benchmark: decode tok/s of 16 concurrent json_schema requests against 16 free ones.

    .venv/bin/python -m kiln.bench.constrained [--requests 16] [--new-tokens 128] [--rounds 2] [--compile]

One in-process engine serves both kinds, alternating free and constrained rounds so that a busy
neighbour hurts both alike. The schema asks for a list of at least 40 records, so no constrained
request completes its JSON (and stops) before --new-tokens: both kinds decode the same batch for
the same number of steps. Decode tok/s counts the tokens made after every request has its first
token, over the time since then; the goal is constrained >= 0.8x free.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

RESULTS = Path(__file__).parent / "results"
RECORD = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}}, "required": ["name", "age", "city"]}
SCHEMA = json.dumps({"type": "object", "properties": {"people": {"type": "array", "items": RECORD, "minItems": 40}}, "required": ["people"]})
TOPICS = ["friends", "writers", "sailors", "doctors", "painters", "pilots", "chefs", "teachers",
          "farmers", "singers", "runners", "bakers", "poets", "judges", "actors", "coders"]  # fmt: skip


def run(core: EngineCore, prompts: list[list[int]], params: SamplingParams) -> dict[str, float]:
    for i, ids in enumerate(prompts):
        core.add(GenerateRequest(str(i), ids, params))
    started: set[str] = set()
    decode_start, decode_tokens, finished = 0.0, 0, []
    while core.has_work:
        for out in core.step():
            if len(started) == len(prompts):
                decode_tokens += len(out.new_ids)
            elif out.new_ids:
                started.add(out.rid)
                if len(started) == len(prompts):
                    decode_start = time.monotonic()
            if out.finish_reason is not None:
                finished.append(type(out.finish_reason).__name__)
    wall = time.monotonic() - decode_start
    assert finished == ["FinishLength"] * len(prompts), finished  # every request decoded to the end
    return {"decode_tok_s": decode_tokens / wall, "decode_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--compile", action="store_true", help="serve the compiled model (default: eager)")
    args = ap.parse_args()
    core = EngineCore(ServerArgs(dtype=args.dtype, disable_compile=not args.compile, max_running_requests=args.requests, max_total_tokens=16384))
    chat = lambda topic: core.tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": f"List forty {topic} as JSON records with name, age and city."}], add_generation_prompt=True, tokenize=False
    )
    prompts = [core.tokenizer(chat(TOPICS[i % len(TOPICS)])).input_ids for i in range(args.requests)]
    kinds = {
        "free": SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True),
        "json_schema": SamplingParams(temperature=0, max_new_tokens=args.new_tokens, json_schema=SCHEMA),
    }
    run(core, prompts[:2], SamplingParams(temperature=0, max_new_tokens=4, json_schema=SCHEMA))  # warm-up: compiles the grammar
    rounds: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for name, params in kinds.items():
            rounds[name].append(run(core, prompts, params))
            print(f"{name:12} decode {rounds[name][-1]['decode_tok_s']:7.1f} tok/s")
    median = {k: statistics.median(r["decode_tok_s"] for r in v) for k, v in rounds.items()}
    ratio = median["json_schema"] / median["free"]
    print(f"\nmedian decode tok/s: free {median['free']:.1f}, json_schema {median['json_schema']:.1f}: constrained / free = {ratio:.2f} (goal >= 0.8)")
    result = {**vars(args), "date": time.strftime("%Y-%m-%d"), "rounds": rounds, "median_decode_tok_s": median, "ratio": ratio}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "constrained.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
