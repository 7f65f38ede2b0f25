"""Rank 0's handle on the other tensor-parallel ranks: starting its node's, the channel to all of them,
noticing a death, stopping them."""

import logging
import os
import subprocess

from kiln.serving.engine.device import resolve_device
from kiln.serving.engine.distributed import join, open_store, rendezvous_address, spawn_local_ranks, stop_ranks
from kiln.serving.engine.step_channel import Kind, RankGone, StepChannel
from kiln.serving.server_args import ServerArgs

log = logging.getLogger(__name__)


class TensorParallelRanks:
    def __init__(self, channel: StepChannel, procs: dict[int, subprocess.Popen]):
        self.channel = channel
        self.procs = procs
        # Each becomes readable when its process ends: the engine loop waits on them beside its pipe.
        self.exit_fds = [os.pidfd_open(p.pid) for p in procs.values()]

    @classmethod
    def start(cls, args: ServerArgs, dp_rank: int = 0) -> "TensorParallelRanks":
        """Rank 0: opens the rendezvous, starts this node's other ranks, and waits (--dist-timeout) for all of them."""
        host, port = rendezvous_address(args, dp_rank)
        device = resolve_device(args.device)
        store = open_store(args, 0, host, port)
        procs = spawn_local_ranks(args, host, store.port, device, skip_first=True)
        try:
            tp = join(args, 0, store, device)
        except BaseException:
            for proc in procs.values():
                proc.kill()
            raise
        return cls(StepChannel(tp), procs)

    def check(self) -> None:
        """Raises RankGone when a rank of this node has exited."""
        for rank, proc in self.procs.items():
            if proc.poll() is not None:
                raise RankGone("its process ended")

    def explain(self, exc: RankGone) -> str:
        """The log line for a lost rank: which one, when it is on this node."""
        for rank, proc in self.procs.items():
            if proc.poll() is not None:
                return f"tensor-parallel rank {rank} is gone (exit code {proc.returncode}): {exc}"
        return f"a tensor-parallel rank is gone or out of step: {exc}"

    def heartbeat(self) -> None:
        self.channel.send(Kind.HEARTBEAT)

    def stop(self, graceful: bool = True) -> None:
        """Tells the ranks to stop and waits for this node's; after a failure, kills this node's (the other
        nodes' see rank 0's sockets close)."""
        try:
            if graceful:
                self.channel.send(Kind.STOP)
        except RankGone:
            graceful = False
        for proc in self.procs.values():
            if not graceful:
                proc.kill()
        stop_ranks(self.procs)
        for fd in self.exit_fds:
            os.close(fd)
