"""What rank 0 tells the other tensor-parallel ranks, over torch.distributed broadcasts on their group.

Every message is one int64 tensor of MESSAGE_LEN numbers: a header ([kind, sizes...]) and, when it fits, the
flat payload whose length the header gives; a longer payload follows in a second broadcast. One broadcast
per decode step, since each costs the receiver a wake-up (about 1.7 ms on a loaded 2-core VM, 0.5 ms when
it is already waiting). A forward's payload holds the step's ids, positions, the
attention metadata's per-row and per-request numbers, the request-table writes since the last step and the
row ranges whose logits rank 0 computes: from it a rank rebuilds the same StepInputs and makes the same
model calls, whose collectives then line up with rank 0's.
"""

from dataclasses import dataclass
from enum import IntEnum

import msgspec
import torch
import torch.distributed as dist
from torch import Tensor

from kiln.ops.tensor_parallel import TensorParallel

HEADER_LEN = 6
MESSAGE_LEN = 1024  # a decode step of up to about 100 requests fits whole
# Rank 0 sends a heartbeat when idle this long, so that the others' wait for the next message stays within
# distributed.COLLECTIVE_TIMEOUT and a rank gone while idle is noticed.
HEARTBEAT_S = 10.0


class Kind(IntEnum):
    FORWARD = 1  # sizes: requests, rows, table-write numbers, logit ranges
    WEIGHTS = 2  # sizes: payload bytes (msgpack [model_path, load_format], one per int64); every rank then reports success
    HEARTBEAT = 3
    STOP = 4


class RankGone(BaseException):
    """A collective failed: a rank died or the ranks are out of step. Not an Exception, so that the engine's
    per-batch error handling (end the batch, carry on) does not absorb it: only ending the process is safe."""


@dataclass
class ForwardStep:
    ids: Tensor
    positions: Tensor
    out_slots: Tensor
    req_indices: list[int]
    seq_lens: list[int]
    ext: list[int]
    table_writes: Tensor
    logit_ranges: list[tuple[int, int]]


class StepChannel:
    def __init__(self, tp: TensorParallel):
        self.tp = tp

    def _broadcast(self, t: Tensor) -> None:
        try:
            dist.broadcast(t, 0, group=self.tp.group)
        except Exception as exc:
            raise RankGone(f"a tensor-parallel broadcast failed: {exc}") from exc

    def _send(self, kind: Kind, sizes: list[int], payload: Tensor | None = None) -> None:
        message = torch.zeros(MESSAGE_LEN, dtype=torch.int64)
        message[0] = kind
        message[1 : 1 + len(sizes)] = torch.tensor(sizes, dtype=torch.int64)
        inline = payload is not None and payload.numel() <= MESSAGE_LEN - HEADER_LEN
        if inline:
            message[HEADER_LEN : HEADER_LEN + payload.numel()] = payload
        self._broadcast(message)
        if payload is not None and not inline:
            self._broadcast(payload)

    def _payload(self, message: Tensor, n: int) -> Tensor:
        """The message's payload of n int64s: inline, or the next broadcast."""
        if n <= MESSAGE_LEN - HEADER_LEN:
            return message[HEADER_LEN : HEADER_LEN + n]
        payload = torch.zeros(n, dtype=torch.int64)
        self._broadcast(payload)
        return payload

    def send_forward(self, step: ForwardStep) -> None:
        ranges = torch.tensor(step.logit_ranges, dtype=torch.int64).flatten()
        numbers = torch.tensor([*step.req_indices, *step.seq_lens, *step.ext], dtype=torch.int64)
        rows = torch.cat([step.ids.cpu(), step.positions.cpu(), step.out_slots.cpu()])
        payload = torch.cat([rows, numbers, step.table_writes, ranges])
        self._send(Kind.FORWARD, [len(step.ext), step.ids.shape[0], step.table_writes.shape[0], len(step.logit_ranges)], payload)

    def send_weights(self, model_path: str, load_format: str | None) -> None:
        data = msgspec.msgpack.encode([model_path, load_format])
        self._send(Kind.WEIGHTS, [len(data)], torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64))

    def send(self, kind: Kind) -> None:
        """A message without payload: HEARTBEAT or STOP."""
        self._send(kind, [])

    def all_ok(self, ok: bool) -> bool:
        """Whether every rank succeeded (each rank calls it after its own attempt)."""
        flag = torch.tensor([int(ok)], dtype=torch.int64)
        try:
            dist.all_reduce(flag, dist.ReduceOp.MIN, group=self.tp.group)
        except Exception as exc:
            raise RankGone(f"a tensor-parallel all-reduce failed: {exc}") from exc
        return bool(flag.item())

    def receive(self) -> tuple[Kind, ForwardStep | tuple[str, str | None] | None]:
        """The next message from rank 0 (blocks until it comes)."""
        message = torch.zeros(MESSAGE_LEN, dtype=torch.int64)
        self._broadcast(message)
        kind, *sizes = message[:HEADER_LEN].tolist()
        kind = Kind(kind)
        if kind == Kind.WEIGHTS:
            data = self._payload(message, sizes[0]).to(torch.uint8)
            model_path, load_format = msgspec.msgpack.decode(data.numpy().tobytes())
            return kind, (model_path, load_format)
        if kind != Kind.FORWARD:
            return kind, None
        num_reqs, num_rows, num_writes, num_ranges = sizes[:4]
        payload = self._payload(message, 3 * num_rows + 3 * num_reqs + num_writes + 2 * num_ranges)
        ids, positions, out_slots, numbers, writes, ranges = payload.split(
            [num_rows, num_rows, num_rows, 3 * num_reqs, num_writes, 2 * num_ranges]
        )  # fmt: skip
        numbers, flat = numbers.tolist(), ranges.tolist()
        return kind, ForwardStep(
            ids, positions, out_slots, numbers[:num_reqs], numbers[num_reqs : 2 * num_reqs], numbers[2 * num_reqs :], writes,
            [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)],
        )  # fmt: skip
