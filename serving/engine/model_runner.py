"""Turns a scheduled batch into tensors, runs the model, returns last-token logits."""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from kiln.ops.attention import AttentionMetadata
from kiln.serving.engine.kv_pool import KVPool
from kiln.serving.engine.scheduler import ScheduledBatch


class ModelRunner:
    """`forward` is the model's forward, or the compiled one; `model` computes logits."""

    def __init__(self, forward: Callable[..., Tensor], model: nn.Module, pool: KVPool, device: torch.device):
        self.forward_fn = forward
        self.model = model
        self.pool = pool
        self.device = device

    @torch.inference_mode()
    def hidden_states(self, batch: ScheduledBatch) -> tuple[Tensor, list[int]]:
        """The model's output rows [T, hidden] (padding rows may follow) and each request's new-token count."""
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
        hidden = self.forward_fn(
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            (self.pool.k, self.pool.v),
            meta,
        )
        return hidden, ext

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> tuple[Tensor, dict[int, Tensor]]:
        """Logits [B, vocab] (float32) at each request's last new token, and for requests that
        asked for input logprobs, the logits of the prompt positions this step scores (Req.input_rows)."""
        hidden, ext = self.hidden_states(batch)
        dev = self.device
        last = torch.tensor(ext, device=dev).cumsum(0) - 1
        prompt_logits, offset = {}, 0
        for i, (req, n) in enumerate(zip(batch.reqs, ext)):
            lo, hi = req.input_rows(n)
            if hi > lo:
                prompt_logits[i] = self.model.compute_logits(hidden[offset + lo - req.kv_len : offset + hi - req.kv_len])
            offset += n
        return self.model.compute_logits(hidden[last]), prompt_logits
