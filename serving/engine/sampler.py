"""Turns a batch's last-position logits into next tokens, each row with its own parameters."""

import torch
from torch import Tensor

from kiln.serving.engine.request import Req


def apply_penalties(logits: Tensor, reqs: list[Req], eos_ids: set[int]) -> None:
    """In place: logit_bias, repetition/frequency/presence penalties, and min_new_tokens' stop-token ban."""
    vocab = logits.shape[-1]
    for i, req in enumerate(reqs):
        p = req.params
        if len(req.output_ids) < p.min_new_tokens:
            # Stop ids outside the vocabulary are accepted (as SGLang) and can never be sampled anyway.
            banned = [t for t in req.stop_ids | (set() if p.ignore_eos else eos_ids) if 0 <= t < vocab]
            logits[i, banned] = float("-inf")
        if not p.has_penalties:
            continue
        if p.logit_bias:
            for tok, bias in p.logit_bias.items():
                logits[i, int(tok)] += bias
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.all_ids)), dtype=torch.long, device=logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and req.output_ids:
            counts = torch.bincount(torch.tensor(req.output_ids, device=logits.device), minlength=vocab)[:vocab].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def sample(logits: Tensor, reqs: list[Req]) -> list[int]:
    """logits: [B, V] float32 after penalties. Greedy rows take the argmax."""
    greedy = [r.params.greedy for r in reqs]
    out = logits.argmax(dim=-1)
    if all(greedy):
        return out.tolist()
    rows = torch.tensor([i for i, g in enumerate(greedy) if not g], device=logits.device)
    sub = [reqs[i] for i in rows.tolist()]
    temps = torch.tensor([r.params.temperature for r in sub], device=logits.device)
    probs = torch.softmax(logits[rows] / temps[:, None], dim=-1)
    if any(r.params.top_k > 0 or r.params.top_p < 1 or r.params.min_p > 0 for r in sub):
        probs = _filter(probs, sub)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, and each
    # request's own generator makes seeded requests reproducible in any batch.
    noise = torch.stack([torch.empty(probs.shape[-1]).exponential_(generator=r.generator) for r in sub])
    out[rows] = (probs / noise.to(probs.device)).argmax(dim=-1)
    return out.tolist()


def _filter(probs: Tensor, reqs: list[Req]) -> Tensor:
    vocab = probs.shape[-1]
    top_k = torch.tensor([min(r.params.top_k, vocab) if r.params.top_k > 0 else vocab for r in reqs], device=probs.device)
    top_p = torch.tensor([r.params.top_p for r in reqs], device=probs.device)
    min_p = torch.tensor([r.params.min_p for r in reqs], device=probs.device)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=probs.device)[None, :]
    drop = rank >= top_k[:, None]
    drop |= (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]
    drop |= sorted_p < (min_p * sorted_p[:, 0])[:, None]
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)
