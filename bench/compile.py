"""Compile benchmark: cold and warm start of `kiln serve`, and decode compiled vs eager.

    .venv/bin/python -m kiln.bench.compile [--dtype bfloat16] [--new-tokens 64] [--skip-start]

Start times run `kiln serve` twice on one fresh compile cache and time launch to the first 200
from /health. Decode rates run the same greedy requests (EOS ignored) through an eager and a
compiled engine in this process, at each batch size, and print compiled/eager.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from kiln.bench.common import launch_kiln
from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

RESULTS = Path(__file__).parent / "results"


def time_to_healthy(cache: Path, dtype: str) -> float:
    server = launch_kiln(["--dtype", dtype, "--compile-cache-dir", str(cache)])
    server.stop()
    return server.to_healthy_s


def decode_rate(core: EngineCore, batch: int, new_tokens: int) -> float:
    """Output tokens per second over the decode steps (the prefill step is excluded)."""
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        core.add(GenerateRequest(f"b{batch}-{i}", [100 + i + j for j in range(16)], params))
    core.step()
    t0, steps = time.monotonic(), 0
    while core.has_work:
        core.step()
        steps += 1
    return steps * batch / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--skip-start", action="store_true", help="skip the cold/warm start timing")
    args = ap.parse_args()
    result: dict = {"dtype": args.dtype, "new_tokens": args.new_tokens, "date": time.strftime("%Y-%m-%d")}

    if not args.skip_start:
        with tempfile.TemporaryDirectory() as cache:
            result["cold_start_s"] = round(time_to_healthy(Path(cache), args.dtype), 1)
            result["warm_start_s"] = round(time_to_healthy(Path(cache), args.dtype), 1)
        print(f"launch to /health 200: cold {result['cold_start_s']} s, warm {result['warm_start_s']} s")

    batches = [int(b) for b in args.batches.split(",")]
    rates: dict[str, dict[int, float]] = {}
    for mode in ("eager", "compiled"):
        core = EngineCore(ServerArgs(dtype=args.dtype, max_total_tokens=16384, disable_compile=mode == "eager"))
        decode_rate(core, 2, 4)  # first-call costs out of the way
        rates[mode] = {b: decode_rate(core, b, args.new_tokens) for b in batches}
        if mode == "compiled":
            result["compile"] = core.stats().compile
        del core
    print(f"\n{'batch':>6} {'eager tok/s':>12} {'compiled tok/s':>15} {'compiled/eager':>15}")
    for b in batches:
        e, c = rates["eager"][b], rates["compiled"][b]
        print(f"{b:>6} {e:>12.1f} {c:>15.1f} {c / e:>14.2f}x")
    result["decode_tok_s"] = {str(b): {"eager": round(rates["eager"][b], 1), "compiled": round(rates["compiled"][b], 1)} for b in batches}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"compile-{args.dtype}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
