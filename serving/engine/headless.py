"""`kiln serve --node-rank k` (k > 0): no HTTP server, no tokenizer; this node's tensor-parallel ranks, watched.

Exits 0 when rank 0 has stopped them all, and 1 as soon as one fails (rank 0's death makes them fail: its
sockets close), on SIGTERM or SIGINT too, killing the others.
"""

import logging
import os
import signal
import sys
from multiprocessing.connection import wait
from types import FrameType

from kiln.serving.engine.device import resolve_device
from kiln.serving.engine.distributed import ranks_per_node, rendezvous_address, spawn_local_ranks
from kiln.serving.server_args import ServerArgs

log = logging.getLogger(__name__)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    sys.exit(1)


def run_headless(args: ServerArgs) -> int:
    host, port = rendezvous_address(args)
    log.info("node %d of %d: %d tensor-parallel ranks, rendezvous at %s:%d", args.node_rank, args.nnodes, ranks_per_node(args), host, port)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    procs = spawn_local_ranks(args, host, port, resolve_device(args.device), skip_first=False)
    running = {os.pidfd_open(proc.pid): rank for rank, proc in procs.items()}
    try:
        while running:
            for fd in wait(list(running)):
                rank = running.pop(fd)
                os.close(fd)
                code = procs[rank].wait()
                if code != 0:
                    log.error("tensor-parallel rank %d exited with code %d: this node stops", rank, code)
                    return 1
        log.info("rank 0 stopped this node's ranks")
        return 0
    except KeyboardInterrupt:
        return 1
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
