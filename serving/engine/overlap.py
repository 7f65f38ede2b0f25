"""Overlapped steps: the forward and sampling of step N run on a worker thread while the engine plans step
N+1 and processes step N-1's tokens (SGLang's overlap scheduler, vLLM's async scheduling).

The host never waits for step N's tokens to plan N+1. Each token an overlapped step samples gets a
placeholder: a negative id, -(i + 1), naming entry i of a ring of ids kept on the device. The placeholder sits
in its request's output_ids until the host reads the step's ids; meanwhile the next step's input carries it,
and the worker swaps it for the sampled id just before that forward. Steps run one at a time and in order on
the worker, so a K/V slot a step writes is written before any later step reads it, and a slot freed while a
step is in flight is only handed to a later one.
"""

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from kiln.serving.engine.model_runner import ModelRunner
from kiln.serving.engine.request import Req
from kiln.serving.engine.sampler import apply_penalties, sample_ids
from kiln.serving.engine.scheduler import ScheduledBatch, Scheduler


class FutureTokens:
    """A ring of sampled ids on the device, which placeholders name. It holds `size` ids: a placeholder lives
    for two steps (its own and the next), so three steps' worth of sampling rows never wrap onto a live one."""

    def __init__(self, size: int, device: torch.device):
        self.ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.next = 0

    def reserve(self, n: int) -> tuple[list[int], Tensor]:
        """n placeholders, and the ring entries they name (to store the sampled ids in)."""
        index = [(self.next + j) % len(self.ids) for j in range(n)]
        self.next = (self.next + n) % len(self.ids)
        return [-i - 1 for i in index], torch.tensor(index, dtype=torch.int64, device=self.ids.device)

    def resolve(self, ids: Tensor) -> Tensor:
        """ids with every placeholder replaced by the id sampled for it."""
        return torch.where(ids < 0, self.ids[(-ids - 1).clamp(min=0)], ids)

    def store(self, index: Tensor, ids: Tensor) -> None:
        self.ids[index] = ids


@dataclass
class InFlight:
    """A launched step: the rows that sample, where each one's placeholder sits, and the worker's result
    (the sampled ids and, when asked, their logprobs, both on the device)."""

    batch: ScheduledBatch
    reqs: list[Req]
    at: list[int]  # index of each row's placeholder in its output_ids
    result: "Future[tuple[Tensor, Tensor | None]]"


class OverlapWorker:
    """Launches steps on one worker thread (torch releases the GIL inside its ops; on CUDA the kernels queue
    on the stream, in order)."""

    def __init__(self, runner: ModelRunner, eos_ids: set[int], max_rows: int):
        self.runner = runner
        self.eos_ids = eos_ids
        self.futures = FutureTokens(3 * max_rows + 1, runner.device)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-step")

    def launch(self, batch: ScheduledBatch, scheduler: Scheduler) -> InFlight:
        """Starts the batch's forward and sampling, and moves its requests on as if it had run: kv_len counts
        the step's tokens and each sampling row gets a placeholder, so the next step can be planned now."""
        inputs = self.runner.prepare(batch)
        ready = [scheduler.advance(r, len(ids)) for r, ids in zip(batch.reqs, batch.extends)]
        rows = [i for i, r in enumerate(ready) if r]
        reqs = [batch.reqs[i] for i in rows]
        # What the sampler reads from a request's changing state is taken now, on this thread.
        generated = [len(r.output_ids) for r in reqs]
        placeholders, index = self.futures.reserve(len(reqs))
        for req, p in zip(reqs, placeholders):
            req.output_ids.append(p)
        want_logprobs = any(r.logprob for r in reqs)

        def step() -> tuple[Tensor, Tensor | None]:
            with torch.inference_mode():
                hidden = self.runner.run(inputs, self.futures.resolve(inputs.ids))
                if not rows:
                    return index, None  # prompt chunks only: nothing sampled
                logits = self.runner.last_logits(hidden, inputs.ext)[rows]
                logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
                apply_penalties(logits, reqs, self.eos_ids, generated)
                ids = sample_ids(logits, reqs, generated)
                self.futures.store(index, ids)
                return ids, logprobs

        return InFlight(batch, reqs, generated, self.thread.submit(step))

    def close(self) -> None:
        self.thread.shutdown(wait=True)
