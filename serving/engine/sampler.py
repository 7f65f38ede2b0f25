"""Turns a batch's last-position logits into next tokens, each row with its own parameters.

Everything runs as tensor ops over the whole [B, V] batch, each request's parameters gathered into per-row
tensors; the host only lists the requests' ids and numbers. Seeded noise comes from noise.py, on the logits'
device.
"""

import torch
from torch import Tensor

from kiln.serving.engine.noise import exponential_noise
from kiln.serving.engine.request import Req
from kiln.serving.sampling_params import SamplingParams


def apply_penalties(logits: Tensor, reqs: list[Req], eos_ids: set[int], generated: list[int] | None = None) -> None:
    """In place: logit_bias, the repetition penalty (over prompt and output), frequency and presence penalties
    (over the output), then min_new_tokens' ban of stop tokens. `generated`: each row's count of output tokens
    (default: len(output_ids)), given when the requests move on while this runs (overlapped steps)."""
    params = [r.params for r in reqs]
    generated = [len(r.output_ids) for r in reqs] if generated is None else generated
    vocab, device = logits.shape[-1], logits.device
    bias = [(i, int(tok), b) for i, p in enumerate(params) for tok, b in (p.logit_bias or {}).items()]
    if bias:
        rows, toks, values = zip(*bias)
        if not all(0 <= t < vocab for t in toks):
            # Checked on the host: out of range on a GPU is a device-side assert, which would end every request.
            raise IndexError(f"a logit_bias token is outside the vocabulary of {vocab}")
        index = (torch.tensor(rows, device=device), torch.tensor(toks, device=device))
        logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _token_counts([r.all_ids if r.params.repetition_penalty != 1.0 else [] for r in reqs], vocab, device) > 0
        penalty = _column([p.repetition_penalty for p in params], logits)
        logits.copy_(torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits))
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        counts = _token_counts([r.output_ids for r in reqs], vocab, device)
        frequency = _column([p.frequency_penalty for p in params], logits)
        presence = _column([p.presence_penalty for p in params], logits)
        logits -= frequency * counts + presence * (counts > 0)
    banned = [
        (i, t)
        for i, r in enumerate(reqs)
        if generated[i] < r.params.min_new_tokens
        # Stop ids outside the vocabulary are accepted (as SGLang) and can never be sampled anyway.
        for t in r.stop_ids | (set() if r.params.ignore_eos else eos_ids)
        if 0 <= t < vocab
    ]
    if banned:
        rows, toks = zip(*banned)
        logits[torch.tensor(rows, device=device), torch.tensor(toks, device=device)] = float("-inf")


def edits_logits(req: Req) -> bool:
    """Whether apply_penalties changes this request's row now (the sampler itself never edits logits)."""
    p = req.params
    return bool(p.logit_bias) or p.repetition_penalty != 1.0 or bool(p.frequency_penalty or p.presence_penalty) or len(req.output_ids) < p.min_new_tokens


def sample(logits: Tensor, reqs: list[Req]) -> list[int]:
    """sample_ids, read back to the host."""
    return sample_ids(logits, reqs).tolist()


def sample_ids(logits: Tensor, reqs: list[Req], generated: list[int] | None = None) -> Tensor:
    """logits: [B, V] float32 after penalties. Greedy rows take the argmax; the others draw from their tempered,
    filtered distribution with noise made from their seed and their count of generated tokens (`generated`,
    default len(output_ids)). The ids stay on the logits' device."""
    out = logits.argmax(dim=-1)
    drawn = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if not drawn:
        return out
    device = logits.device
    sub = [reqs[i] for i in drawn]
    params = [r.params for r in sub]
    rows = torch.tensor(drawn, device=device)
    probs = torch.softmax(logits[rows] / _column([p.temperature for p in params], logits), dim=-1)
    if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
        probs = _filter(probs, params)
    seeds = torch.tensor([r.seed for r in sub], dtype=torch.int64, device=device)
    counts = [len(r.output_ids) for r in reqs] if generated is None else generated
    steps = torch.tensor([counts[i] for i in drawn], dtype=torch.int64, device=device)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
    out[rows] = (probs / exponential_noise(seeds, steps, probs.shape[-1])).argmax(dim=-1)
    return out


def _column(values: list[float], like: Tensor) -> Tensor:
    """A [B, 1] per-row parameter, ready to broadcast over the vocabulary."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def _token_counts(ids: list[list[int]], vocab: int, device: torch.device) -> Tensor:
    """[B, V] float32: how often each token occurs in each row's ids, by one scatter_add of the ids padded to the
    longest row with an extra column, which is then cut off."""
    width = max(map(len, ids), default=0)
    padded = torch.tensor([row + [vocab] * (width - len(row)) for row in ids], dtype=torch.int64).reshape(len(ids), width)
    padded = padded.to(device)
    counts = torch.zeros(len(ids), vocab + 1, device=device)
    return counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))[:, :vocab]


def _filter(probs: Tensor, params: list[SamplingParams]) -> Tensor:
    vocab = probs.shape[-1]
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=probs.device)
    top_p = torch.tensor([p.top_p for p in params], device=probs.device)
    min_p = torch.tensor([p.min_p for p in params], device=probs.device)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=probs.device)[None, :]
    drop = rank >= top_k[:, None]
    drop |= (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]
    drop |= sorted_p < (min_p * sorted_p[:, 0])[:, None]
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)
