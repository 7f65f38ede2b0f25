"""Turns a scheduled batch into tensors, runs the model, returns last-token logits."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kiln.ops.attention import AttentionMetadata
from kiln.serving.engine.kv_pool import KVPool
from kiln.serving.engine.scheduler import ScheduledBatch


@dataclass
class StepInputs:
    """A batch as the model reads it, built from the requests' state before the step runs."""

    ids: Tensor  # [T]; in an overlapped step, negative ids stand for tokens not sampled yet (overlap.py)
    positions: Tensor
    meta: AttentionMetadata
    ext: list[int]  # each request's new-token count


class ModelRunner:
    """`forward` is the model's forward, or the compiled one; `model` computes logits."""

    def __init__(self, forward: Callable[..., Tensor], model: nn.Module, pool: KVPool, device: torch.device):
        self.forward_fn = forward
        self.model = model
        self.pool = pool
        self.device = device

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The batch's tensors, read from each request's kv_len and slots (before the step moves them on)."""
        ids, positions, slots, lens, ext = [], [], [], [], []
        for req, extend in zip(batch.reqs, batch.extends):
            start = req.kv_len
            ids += extend
            positions += range(start, start + len(extend))
            slots.append(self.pool.req_to_token[req.row, start : start + len(extend)])
            lens.append(start + len(extend))
            ext.append(len(extend))
        dev = self.device
        meta = AttentionMetadata.build(torch.cat(slots), self.pool.req_to_token, [r.row for r in batch.reqs], lens, ext)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=dev)  # noqa: E731
        return StepInputs(as_tensor(ids), as_tensor(positions), meta, ext)

    @torch.inference_mode()
    def run(self, inputs: StepInputs, ids: Tensor | None = None) -> Tensor:
        """The model's output rows [T, hidden] (padding rows may follow); `ids` replaces inputs.ids."""
        return self.forward_fn(inputs.ids if ids is None else ids, inputs.positions, (self.pool.k, self.pool.v), inputs.meta)

    def last_logits(self, hidden: Tensor, ext: list[int]) -> Tensor:
        """Logits [B, vocab] (float32) at each request's last new token."""
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
        hidden, ext = self.hidden_states(batch)
        prompt_logits, offset = {}, 0
        for i, (req, n) in enumerate(zip(batch.reqs, ext)):
            lo, hi = req.input_rows(n)
            if hi > lo:
                prompt_logits[i] = self.model.compute_logits(hidden[offset + lo - req.kv_len : offset + hi - req.kv_len])
            offset += n
        return self.last_logits(hidden, ext), prompt_logits
