"""The sampler's counter-based noise: splitmix64 exactly (int64 tensors wrap as unsigned words do), and Exp(1) draws."""

import math

import torch

from kiln.serving.engine.noise import GAMMA, MASK_64, as_int64, exponential_noise, random_words


def splitmix64_reference(x: int) -> int:
    x &= MASK_64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK_64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK_64
    return x ^ (x >> 31)


def test_words_are_splitmix64_of_seed_step_and_index():
    seeds, steps, vocab = [0, 1, -5, 2**63 + 12345, 2**64 - 2**16 - 1], [0, 7, 3, 2**40, 1], 6
    got = random_words(torch.tensor([as_int64(s) for s in seeds]), torch.tensor(steps), vocab)
    for row, (seed, step) in enumerate(zip(seeds, steps)):
        key = splitmix64_reference(splitmix64_reference(seed) + step)
        want = [as_int64(splitmix64_reference(key + (j + 1) * GAMMA)) for j in range(vocab)]
        assert got[row].tolist() == want


def test_noise_is_exponential():
    noise = exponential_noise(torch.arange(200), torch.zeros(200, dtype=torch.int64), 500).flatten().double()
    assert noise.min() > 0 and torch.isfinite(noise).all()
    # Kolmogorov-Smirnov against Exp(1): 1.95 / sqrt(n) is the 0.1% critical value.
    x = noise.sort().values
    n = len(x)
    cdf = 1 - torch.exp(-x)
    gap = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max().item()
    assert gap < 1.95 / math.sqrt(n)


def test_neighbouring_seeds_and_steps_are_uncorrelated():
    a = exponential_noise(torch.tensor([10, 10]), torch.tensor([0, 1]), 20000)
    b = exponential_noise(torch.tensor([11]), torch.tensor([0]), 20000)
    for x, y in [(a[0], a[1]), (a[0], b[0])]:
        assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < 0.03
