"""The batched penalties against a plain per-row, per-token reference, on random batches (hypothesis)."""

import math
from collections import Counter

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.serving.engine.request import Req
from kiln.serving.engine.sampler import apply_penalties
from kiln.serving.sampling_params import SamplingParams

VOCAB = 12
EOS = {0, 11}


def reference(logits: list[float], req: Req, eos_ids: set[int]) -> list[float]:
    """One row: logit_bias, repetition penalty over prompt and output, frequency and presence over the output,
    then the min_new_tokens ban of eos and stop ids."""
    p, out = req.params, list(logits)
    for tok, bias in (p.logit_bias or {}).items():
        out[int(tok)] += bias
    if p.repetition_penalty != 1.0:
        for tok in set(req.input_ids + req.output_ids):
            out[tok] = out[tok] / p.repetition_penalty if out[tok] > 0 else out[tok] * p.repetition_penalty
    for tok, count in Counter(req.output_ids).items():
        out[tok] -= p.frequency_penalty * count + p.presence_penalty
    if len(req.output_ids) < p.min_new_tokens:
        for tok in req.stop_ids | (set() if p.ignore_eos else eos_ids):
            if 0 <= tok < len(out):
                out[tok] = -math.inf
    return out


token = st.integers(0, VOCAB - 1)
params = st.builds(
    SamplingParams,
    repetition_penalty=st.one_of(st.just(1.0), st.floats(0.1, 2.0)),
    frequency_penalty=st.one_of(st.just(0.0), st.floats(-2.0, 2.0)),
    presence_penalty=st.one_of(st.just(0.0), st.floats(-2.0, 2.0)),
    logit_bias=st.one_of(st.none(), st.dictionaries(token.map(str), st.floats(-5.0, 5.0), max_size=4)),
    min_new_tokens=st.integers(0, 3),
    max_new_tokens=st.just(8),
    stop_token_ids=st.one_of(st.none(), st.lists(st.integers(-2, VOCAB + 2), max_size=3)),
    ignore_eos=st.booleans(),
)
request = st.tuples(params, st.lists(token, min_size=1, max_size=8), st.lists(token, max_size=8))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(request, st.lists(st.floats(-5.0, 5.0), min_size=VOCAB, max_size=VOCAB)), min_size=1, max_size=5))
def test_batched_penalties_equal_the_per_row_reference(rows):
    reqs, logits = [], []
    for (p, prompt, output), row in rows:
        req = Req("r", prompt, p, seed=0)
        req.output_ids = output
        reqs.append(req)
        logits.append(row)
    got = torch.tensor(logits)
    apply_penalties(got, reqs, EOS)
    want = torch.tensor([reference(row, req, EOS) for row, req in zip(logits, reqs)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
