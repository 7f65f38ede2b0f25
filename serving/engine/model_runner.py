"""Turns a scheduled batch into tensors, runs the model, returns last-token logits."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kiln.ops.attention import AttentionMetadata
from kiln.serving.engine.kv_pool import KVPool
from kiln.serving.engine.scheduler import ScheduledBatch
from kiln.serving.engine.step_channel import ForwardStep, RankGone, StepChannel


@dataclass
class StepInputs:
    """A batch as the model reads it, built from the requests' state before the step runs."""

    ids: Tensor  # [T]; in an overlapped step, negative ids stand for tokens not sampled yet (overlap.py)
    positions: Tensor
    meta: AttentionMetadata
    ext: list[int]  # each request's new-token count


class ModelRunner:
    """`forward` is the model's forward, or the compiled one; `model` computes logits. With tensor
    parallelism, rank 0's runner sends each step down `channel` before running it, and the other ranks'
    runners `follow` it with the same calls (tp_worker.py)."""

    def __init__(self, forward: Callable[..., Tensor], model: nn.Module, pool: KVPool, device: torch.device, channel: StepChannel | None = None):
        self.forward_fn = forward
        self.model = model
        self.pool = pool
        self.device = device
        self.channel = channel
        if channel is not None:
            pool.table_writes = []

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The batch's tensors, read from each request's kv_len and slots (before the step moves them on).

        Every per-row and per-request number goes into one host tensor, made from one list and copied to the
        device once; the inputs are views of it, and the output slots one gather from the slot table."""
        ids, positions, rows, lens, ext, starts = [], [], [], [], [], []
        for req, extend in zip(batch.reqs, batch.extends):
            start, n = req.kv_len, len(extend)
            ids += extend
            positions += range(start, start + n)
            starts.append(len(ids) - n)
            rows.append(req.row)
            lens.append(start + n)
            ext.append(n)
        t, b = len(ids), len(rows)
        host = torch.tensor(ids + positions + rows + lens + ext + starts + [max(ext, default=0)], dtype=torch.int64)
        packed = host[:-1].to(self.device)
        ids_t, pos_t, rows_t, lens_t, ext_t, starts_t = packed.split([t, t, b, b, b, b])
        token_rows = rows_t if t == b else rows_t.repeat_interleave(ext_t, output_size=t)
        table = self.pool.req_to_token
        meta = AttentionMetadata(table[token_rows, pos_t].long(), table, rows_t, lens_t, ext_t, starts_t, host[-1:])
        return StepInputs(ids_t, pos_t, meta, ext)

    def inputs(self, ids: Tensor, positions: Tensor, out_slots: Tensor, rows: list[int], lens: list[int], ext: list[int]) -> StepInputs:
        meta = AttentionMetadata.build(out_slots, self.pool.req_to_token, rows, lens, ext)
        return StepInputs(ids.to(self.device), positions.to(self.device), meta, ext)

    @torch.inference_mode()
    def run(self, inputs: StepInputs, ids: Tensor | None = None) -> Tensor:
        """The model's output rows [T, hidden] (padding rows may follow); `ids` replaces inputs.ids."""
        return self.forward_fn(inputs.ids if ids is None else ids, inputs.positions, (self.pool.k, self.pool.v), inputs.meta)

    def last_logits(self, hidden: Tensor, ext: list[int]) -> Tensor:
        """Logits [B, vocab] (float32) at each request's last new token."""
        if len(ext) == sum(ext):  # one new token per request (decode): the rows are the requests', in order
            return self.model.compute_logits(hidden[: len(ext)])
        last = torch.tensor(ext, device=self.device).cumsum(0) - 1
        return self.model.compute_logits(hidden[last])

    @torch.inference_mode()
    def hidden_states(self, batch: ScheduledBatch) -> tuple[Tensor, list[int]]:
        """The model's output rows [T, hidden] (padding rows may follow) and each request's new-token count."""
        inputs = self.prepare(batch)
        return self.run(inputs), inputs.ext

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> tuple[Tensor, dict[int, Tensor]]:
        """Logits [B, vocab] (float32) at each request's last new token, and for requests that
        asked for input logprobs, the logits of the prompt positions this step scores (Req.input_rows)."""
        inputs = self.prepare(batch)
        ranges, offset = {}, 0
        for i, (req, n) in enumerate(zip(batch.reqs, inputs.ext)):
            lo, hi = req.input_rows(n)
            if hi > lo:
                ranges[i] = (offset + lo - req.kv_len, offset + hi - req.kv_len)
            offset += n
        if self.channel is None:
            return self._logits(inputs, ranges)
        # Once sent, the other ranks run this step: any failure from here leaves them out of step with us.
        try:
            meta = inputs.meta
            step = ForwardStep(
                inputs.ids, inputs.positions, meta.out_slots, meta.req_indices.tolist(), meta.seq_lens.tolist(), inputs.ext,
                self.pool.take_table_writes(), list(ranges.values()),
            )  # fmt: skip
            self.channel.send_forward(step)
            return self._logits(inputs, ranges)
        except Exception as exc:
            raise RankGone(f"a tensor-parallel step failed: {type(exc).__name__}: {exc}") from exc

    def _logits(self, inputs: StepInputs, ranges: dict[int, tuple[int, int]]) -> tuple[Tensor, dict[int, Tensor]]:
        # The model calls, in this order, are what follow() repeats on the other ranks.
        hidden = self.run(inputs)
        prompt_logits = {i: self.model.compute_logits(hidden[lo:hi]) for i, (lo, hi) in ranges.items()}
        return self.last_logits(hidden, inputs.ext), prompt_logits

    @torch.inference_mode()
    def follow(self, step: ForwardStep) -> None:
        """Another rank's side of rank 0's forward: the same inputs and model calls; the logits are rank 0's to use."""
        self.pool.apply_table_writes(step.table_writes)
        inputs = self.inputs(step.ids, step.positions, step.out_slots, step.req_indices, step.seq_lens, step.ext)
        self._logits(inputs, dict(enumerate(step.logit_ranges)))
