"""A tensor-parallel rank other than 0: builds the same model shard, KV pool and compiled forward as rank 0
(rank_model.py), then repeats each step rank 0 sends (step_channel.py) until told to stop.

Started by distributed.spawn_local_ranks as `python -m kiln.serving.engine.tp_worker`, reading
(ServerArgs, rank, host, port) pickled on stdin. Exits 0 when rank 0 says stop, 1 on any failure, rank 0's
death included (its sockets close, so the next collective fails at once).
"""

import logging
import pickle
import sys
import traceback
from pathlib import Path

from kiln.models.loader import read_config
from kiln.serving.engine.device import resolve_device
from kiln.serving.engine.distributed import RendezvousError, join, open_store
from kiln.serving.engine.model_runner import ModelRunner
from kiln.serving.engine.rank_model import build_rank_model, locate_checkpoint
from kiln.serving.engine.step_channel import Kind, RankGone, StepChannel
from kiln.serving.engine.weight_update import WeightUpdater
from kiln.serving.server_args import ServerArgs

log = logging.getLogger(__name__)


def follow(args: ServerArgs, channel: StepChannel) -> None:
    device = resolve_device(args.device)
    checkpoint = locate_checkpoint(args)
    cfg = read_config(checkpoint)
    built = build_rank_model(args, device, channel.tp, checkpoint, cfg, zeroed_pool=False)
    runner = ModelRunner(built.compiled or built.model, built.model, built.pool, device)
    weights = WeightUpdater(built.model, checkpoint, Path(args.cache_dir), args.is_embedding, built.quantization, built.dummy_seed, channel)
    log.info("ready: following rank 0's steps")
    while True:
        kind, body = channel.receive()
        if kind == Kind.FORWARD:
            runner.follow(body)
        elif kind == Kind.WEIGHTS:
            weights.update(*body)
        elif kind == Kind.STOP:
            return


def main() -> int:
    args, rank, host, port = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=args.log_level.upper(), format=f"[%(asctime)s tp{rank}] %(message)s")
    try:
        tp = join(args, rank, open_store(args, rank, host, port), resolve_device(args.device))
    except RendezvousError as exc:
        log.error("%s", exc)
        return 1
    try:
        follow(args, StepChannel(tp))
    except RankGone as exc:
        log.error("tensor-parallel rank %d stops: rank 0 is gone or out of step: %s", rank, exc.__cause__ or exc)
        return 1
    except Exception:
        log.error("tensor-parallel rank %d failed: %s", rank, traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
