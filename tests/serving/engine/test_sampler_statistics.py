"""The batched sampler against a plain reference: its draws follow the reference distribution (chi-square on many
draws), and a seeded request draws the same tokens in any batch, row and step."""

import math

import pytest
import torch

from kiln.serving.engine.request import Req
from kiln.serving.engine.sampler import sample
from kiln.serving.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.4, 0.0, -0.3, -1.0, -2.0, -4.0])
# Chi-square critical values at the 0.1% level, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88}


def reference_probs(logits: list[float], p: SamplingParams) -> list[float]:
    """Temperature, then top-k, top-p (keep a token while the mass before it is at most top_p) and min-p."""
    weights = [math.exp(x / p.temperature) for x in logits]
    probs = [w / sum(weights) for w in weights]
    kept, before = set(), 0.0
    for rank, tok in enumerate(sorted(range(len(probs)), key=lambda t: -probs[t])):
        if (p.top_k < 0 or rank < p.top_k) and before <= p.top_p and probs[tok] >= p.min_p * max(probs):
            kept.add(tok)
        before += probs[tok]
    mass = sum(probs[t] for t in kept)
    return [probs[t] / mass if t in kept else 0.0 for t in range(len(probs))]


def chi_square(tokens: list[int], probs: list[float]) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).tolist()
    assert all(c == 0 for c, p in zip(counts, probs) if p == 0), "a token the filters drop was drawn"
    stat = sum((c - len(tokens) * p) ** 2 / (len(tokens) * p) for c, p in zip(counts, probs) if p > 0)
    assert stat < CHI2_999[sum(p > 0 for p in probs) - 1], (counts, probs)
    return stat


CASES = [
    dict(),
    dict(temperature=0.6),
    dict(temperature=1.7, top_k=4),
    dict(top_p=0.8),
    dict(min_p=0.1),
    dict(temperature=1.3, top_k=7, top_p=0.9, min_p=0.02),
]


@pytest.mark.parametrize("params", CASES, ids=str)
def test_draws_across_requests_follow_the_reference(params):
    n = 20000
    reqs = [Req(str(s), [1], SamplingParams(**params), seed=s) for s in range(n)]
    chi_square(sample(LOGITS.repeat(n, 1), reqs), reference_probs(LOGITS.tolist(), SamplingParams(**params)))


@pytest.mark.parametrize("params", [CASES[0], CASES[-1]], ids=str)
def test_one_seeded_request_step_after_step_follows_the_reference(params):
    req = Req("r", [1], SamplingParams(sampling_seed=42, **params), seed=0)
    for _ in range(4000):
        req.output_ids.append(sample(LOGITS[None].clone(), [req])[0])
    chi_square(req.output_ids, reference_probs(LOGITS.tolist(), req.params))


def draw_sequence(position: int, companions: list[SamplingParams], steps: int = 24) -> tuple[list[int], list[list[int]]]:
    """A seeded request's tokens over `steps` steps, sitting at `position` among companions; and the greedy
    companions' tokens against their rows' argmax."""
    gen = torch.Generator().manual_seed(position)
    seeded = Req("seeded", [1, 2], SamplingParams(temperature=0.9, top_p=0.95, sampling_seed=1234), seed=99)
    reqs = [Req(str(i), [3], p, seed=i + 7) for i, p in enumerate(companions)]
    reqs.insert(position, seeded)
    greedy = []
    for _ in range(steps):
        # The seeded row's logits stay the same; every other row changes with the batch.
        logits = torch.randn(len(reqs), LOGITS.shape[0], generator=gen)
        logits[position] = LOGITS
        tokens = sample(logits.clone(), reqs)
        greedy += [[t, a] for t, a, r in zip(tokens, logits.argmax(-1).tolist(), reqs) if r.params.greedy]
        for r, t in zip(reqs, tokens):
            r.output_ids.append(t)
    return seeded.output_ids, greedy


def test_a_seeded_request_draws_the_same_tokens_in_any_batch_and_row():
    alone, _ = draw_sequence(0, [])
    mixed = [SamplingParams(temperature=0), SamplingParams(top_k=3), SamplingParams(sampling_seed=1234, min_p=0.2), SamplingParams(top_k=1)]
    for position in range(len(mixed) + 1):
        tokens, greedy = draw_sequence(position, mixed)
        assert tokens == alone
        assert greedy and all(t == a for t, a in greedy)  # greedy rows are exact argmax
    other_seed = Req("x", [1, 2], SamplingParams(temperature=0.9, top_p=0.95, sampling_seed=1235), seed=99)
    for _ in range(24):
        other_seed.output_ids.append(sample(LOGITS[None].clone(), [other_seed])[0])
    assert other_seed.output_ids != alone
