"""A tensor-parallel rank other than 0: builds the same model shard, KV pool and compiled forward as rank 0
(rank_model.py), then repeats each step rank 0 sends (step_channel.py) until told to stop."""

import logging
from pathlib import Path

from kiln.models.loader import read_config
from kiln.serving.engine.device import resolve_device
from kiln.serving.engine.model_runner import ModelRunner
from kiln.serving.engine.rank_model import build_rank_model, locate_checkpoint
from kiln.serving.engine.step_channel import Kind, StepChannel
from kiln.serving.engine.weight_update import WeightUpdater
from kiln.serving.server_args import ServerArgs

log = logging.getLogger(__name__)


class Follower:
    """This rank's model, pool and runner, built as rank 0 builds its own; `run` repeats rank 0's steps."""

    def __init__(self, args: ServerArgs, channel: StepChannel):
        self.channel = channel
        device = resolve_device(args.device)
        checkpoint = locate_checkpoint(args)
        built = build_rank_model(args, device, channel.tp, checkpoint, read_config(checkpoint), zeroed_pool=False)
        self.runner = ModelRunner(built.compiled or built.model, built.model, built.pool, device)
        self.weights = WeightUpdater(built.model, checkpoint, Path(args.cache_dir), args.is_embedding, built.quantization, built.dummy_seed, channel)

    def run(self) -> None:
        """Until rank 0 says STOP."""
        log.info("ready: following rank 0's steps")
        while True:
            kind, body = self.channel.receive()
            if kind == Kind.FORWARD:
                self.runner.follow(body)
            elif kind == Kind.WEIGHTS:
                self.weights.update(*body)
            elif kind == Kind.STOP:
                return
