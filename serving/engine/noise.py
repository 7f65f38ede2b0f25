"""Seeded sampling noise made on the logits' device: a counter-based generator, so nothing is carried between steps.

Each draw is a pure function of (request seed, tokens the request has generated, vocabulary index), so a seeded
request gets the same noise whatever else is in its batch and whichever row it sits in, and no per-request
generator state lives on the host. The function is splitmix64 (Steele, Lea and Flood): the row's key is
mix(mix(seed) + step), and vocabulary entry j takes the (j + 1)-th output of splitmix64's stream from that key.
torch has no unsigned 64-bit arithmetic, so the 64-bit words live in int64 tensors, whose additions and
multiplications wrap exactly like unsigned ones; only right shifts need masking to be logical.
"""

import torch
from torch import Tensor

GAMMA = 0x9E3779B97F4A7C15
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB
MASK_64 = (1 << 64) - 1


def as_int64(word: int) -> int:
    """A Python integer's low 64 bits as the int64 with the same bits (what torch can hold)."""
    word &= MASK_64
    return word - (1 << 64) if word >> 63 else word


def _shr(x: Tensor, bits: int) -> Tensor:
    # int64's >> copies the sign bit in; the mask clears what came in, making it unsigned's shift.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix(x: Tensor) -> Tensor:
    """splitmix64's finalizer on int64 words: every input bit affects every output bit."""
    x = (x ^ _shr(x, 30)) * as_int64(MIX_1)
    x = (x ^ _shr(x, 27)) * as_int64(MIX_2)
    return x ^ _shr(x, 31)


def random_words(seeds: Tensor, steps: Tensor, vocab: int) -> Tensor:
    """[B, vocab] 64-bit random words (int64) for rows with these seeds, each at this many generated tokens."""
    keys = mix(mix(seeds) + steps)
    counters = torch.arange(1, vocab + 1, dtype=torch.int64, device=seeds.device) * as_int64(GAMMA)
    return mix(keys[:, None] + counters[None, :])


def exponential_noise(seeds: Tensor, steps: Tensor, vocab: int) -> Tensor:
    """[B, vocab] float32 draws of Exp(1), for the exponential race: argmax(p / E) draws a token from p."""
    # 63 random bits with the lowest set, so that u > 0 (E = 0 would make p / E undefined where p = 0). The
    # conversion keeps 24 significant bits at every scale, so small u, hence small E, which decide rare
    # tokens' wins, keep their precision; u rounding up to 1 only makes an infinite E, a token that loses.
    u = (_shr(random_words(seeds, steps, vocab), 1) | 1).float() * 2.0**-63
    return -torch.log1p(-u)
