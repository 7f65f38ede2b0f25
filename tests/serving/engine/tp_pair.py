"""One rank of a two-rank engine run in-process (not a test; test_tensor_parallel.py starts two):
`python tp_pair.py RANK PORT MODEL OUT`. Rank 0 runs an EngineCore through prompts sharing prefixes,
chunked prefills and prompt logprobs, then stops rank 1, a Follower; each saves its KV pool and
request table to OUT, with rank 0's greedy tokens."""

import sys

import torch

from kiln.serving.engine.core import EngineCore
from kiln.serving.engine.distributed import join, open_store
from kiln.serving.engine.step_channel import Kind, StepChannel
from kiln.serving.engine.follower import Follower
from kiln.serving.messages import GenerateRequest, LogprobRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

PREFIX = list(range(3, 40))
LONG = [3 + (7 * i) % 90 for i in range(600)]
WAVES = [
    [PREFIX + [50, 51], PREFIX[:20] + [60], LONG],  # a chunked prefill (chunk 512), steps too long for one broadcast
    [PREFIX + [52, 53, 54], PREFIX[:30], LONG[:400] + [1]],  # cached prefixes: table rows start from the radix cache's slots
]


def main(rank: int, port: int, model: str, out: str) -> None:
    args = ServerArgs(
        model_path=model, skip_tokenizer_init=True, dtype="float32", disable_compile=True, max_total_tokens=2048,
        max_running_requests=4, chunked_prefill_size=512, tp_size=2,
    )  # fmt: skip
    channel = StepChannel(join(args, rank, open_store(args, rank, "127.0.0.1", port), torch.device("cpu")))
    tokens: dict[str, list[int]] = {}
    if rank == 0:
        core = EngineCore(args, channel)
        for w, wave in enumerate(WAVES):
            for i, ids in enumerate(wave):
                params = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
                core.add(GenerateRequest(f"{w}.{i}", ids, params, LogprobRequest(start_len=2) if i == 0 else None))
            while core.has_work:
                for o in core.step():
                    tokens.setdefault(o.rid, []).extend(o.new_ids)
        channel.send(Kind.STOP)
        pool = core.pool
    else:
        follower = Follower(args, channel)
        follower.run()
        pool = follower.runner.pool
    torch.save({"k": pool.k, "v": pool.v, "table": pool.req_to_token, "tokens": tokens}, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
