"""The process of a tensor-parallel rank other than 0, started by distributed.spawn_local_ranks as
`python -m kiln.serving.engine.tp_worker` with (ServerArgs, rank, host, port, device) pickled on stdin.

It joins the ranks first and imports the model code after, so that the rendezvous is not kept waiting by
imports. Exits 0 when rank 0 says stop, 1 on any failure, rank 0's death included (its sockets close, so the
next collective fails at once).
"""

import logging
import pickle
import sys
import traceback

import torch.distributed as dist

from kiln.serving.engine.distributed import RendezvousError, join, open_store
from kiln.serving.engine.step_channel import RankGone, StepChannel

log = logging.getLogger(__name__)


def main() -> int:
    args, rank, host, port, device = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=args.log_level.upper(), format=f"[%(asctime)s tp{rank}] %(message)s")
    try:
        tp = join(args, rank, open_store(args, rank, host, port), device)
    except RendezvousError as exc:
        log.error("%s", exc)
        return 1
    try:
        from kiln.serving.engine.follower import Follower

        Follower(args, StepChannel(tp)).run()
        # Torn down before the interpreter exits: left to exit-time destructors, the process group's threads
        # can abort the process ("terminate called without an active exception", exit -6) after a clean stop.
        dist.destroy_process_group()
    except RankGone as exc:
        log.error("tensor-parallel rank %d stops: rank 0 is gone or out of step: %s", rank, exc.__cause__ or exc)
        return 1
    except Exception:
        log.error("tensor-parallel rank %d failed: %s", rank, traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
