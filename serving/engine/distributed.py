"""Tensor-parallel ranks: where they meet, how they join one process group, and starting a node's local ranks.

Global rank r runs on node r // (tp_size / nnodes). Node 0's engine process is rank 0; every other rank is
a process of its own (`tp_worker.py`), started by its node: by rank 0's engine process on node 0, by the
headless `kiln serve --node-rank k` elsewhere.
"""

import logging
import pickle
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from kiln.ops.tensor_parallel import TensorParallel
from kiln.serving.server_args import ServerArgs

log = logging.getLogger(__name__)

# Collectives wait this long for a slow rank. It is not the start-up bound (--dist-timeout is): one rank may
# still be compiling a cold cache minutes after another finished; a rank that dies is seen at once anyway,
# its sockets close. Rank 0 sends a heartbeat well within it while idle (step_channel.HEARTBEAT_S).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class RendezvousError(RuntimeError):
    pass


def rendezvous_address(args: ServerArgs, dp_rank: int = 0) -> tuple[str, int]:
    """Where the ranks meet: --dist-init-addr, its port moved by dp_rank so that data-parallel engines sharing
    one flag never collide; without it (one node), port 0: rank 0's store takes a free port and tells its ranks."""
    if args.dist_init_addr is None:
        return "127.0.0.1", 0
    host, _, port = args.dist_init_addr.rpartition(":")
    return host.strip("[]"), int(port) + dp_rank


def ranks_per_node(args: ServerArgs) -> int:
    return args.tp_size // args.nnodes


def open_store(args: ServerArgs, rank: int, host: str, port: int) -> dist.TCPStore:
    """Rank 0 listens (on a free port when `port` is 0); the others connect, for at most --dist-timeout."""
    try:
        return dist.TCPStore(
            host, port, args.tp_size, is_master=rank == 0, timeout=timedelta(seconds=args.dist_timeout), wait_for_workers=False
        )
    except Exception as exc:
        raise RendezvousError(f"tensor-parallel rank {rank} could not reach the rendezvous at {host}:{port} within {args.dist_timeout:g}s: {exc}") from exc


def join(args: ServerArgs, rank: int, store: dist.TCPStore, device: torch.device) -> TensorParallel:
    """Joins the process group once all --tp-size ranks have come, or fails after --dist-timeout.

    One group: gloo for CPU tensors and, on CUDA, NCCL for GPU ones, so the model's collectives and the
    step messages (CPU tensors, step_channel.py) share it."""
    if device.type == "cuda":
        torch.cuda.set_device(rank % ranks_per_node(args))
    else:
        # Each rank computes its share of every layer at once with the others: its share of the cores, not all.
        torch.set_num_threads(max(1, torch.get_num_threads() // ranks_per_node(args)))
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=args.tp_size, timeout=timedelta(seconds=args.dist_timeout))
    except Exception as exc:
        where = args.dist_init_addr or f"127.0.0.1:{store.port}"
        raise RendezvousError(
            f"tensor-parallel rank {rank}: the {args.tp_size} ranks did not all meet at {where} within {args.dist_timeout:g}s "
            f"(--tp-size {args.tp_size} over --nnodes {args.nnodes}: is every node started, with the same flags?): {exc}"
        ) from exc
    # From here on, a slow rank is waited for much longer than at start-up (COLLECTIVE_TIMEOUT).
    group = dist.new_group(list(range(args.tp_size)), timeout=COLLECTIVE_TIMEOUT, backend=backend)
    return TensorParallel(rank, args.tp_size, group)


def spawn_local_ranks(args: ServerArgs, host: str, port: int, device: torch.device, skip_first: bool) -> dict[int, subprocess.Popen]:
    """Starts this node's ranks (all but its first when `skip_first`: node 0's engine process is rank 0).

    Plain subprocesses, not multiprocessing: the engine process is a daemon, which multiprocessing forbids
    children. Each runs in its own session, so that a signal to the server's process group reaches rank 0
    alone, which stops the others when it has drained."""
    per_node = ranks_per_node(args)
    first = args.node_rank * per_node
    procs = {}
    for rank in range(first + int(skip_first), first + per_node):
        proc = subprocess.Popen([sys.executable, "-m", "kiln.serving.engine.tp_worker"], stdin=subprocess.PIPE, start_new_session=True)
        proc.stdin.write(pickle.dumps((args, rank, host, port, device)))
        proc.stdin.close()
        log.info("started tensor-parallel rank %d (pid %d)", rank, proc.pid)
        procs[rank] = proc
    return procs


def stop_ranks(procs: dict[int, subprocess.Popen], grace_s: float = 10.0) -> None:
    """Waits for ranks told to stop, then kills those still there."""
    for proc in procs.values():
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
