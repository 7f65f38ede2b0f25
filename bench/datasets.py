"""Benchmark prompts made locally under a seed: random lengths (from token ids or from words), and shared prefixes.

Every request carries both its token ids and their text, so a backend that takes ids (native
/generate) and one that takes text (/v1/completions) serve the same prompt.
"""

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_ids: list[int]
    output_len: int


def _lengths(rng: random.Random, n: int, length: int, range_ratio: float) -> list[int]:
    """n lengths drawn uniformly from [length * range_ratio, length] (at least 1), as SGLang's random dataset."""
    low = max(1, int(length * range_ratio))
    return [rng.randint(low, max(low, length)) for _ in range(n)]


def _word_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that are a space and a lowercase word: prompts made of them read as words and re-tokenize to themselves."""
    vocab = tokenizer.get_vocab()
    words = []
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        text = tokenizer.decode([i])
        if text.startswith(" ") and len(text) >= 4 and text[1:].isascii() and text[1:].isalpha() and text[1:].islower():
            words.append(i)
    return words


def _allowed_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def random_requests(
    tokenizer: PreTrainedTokenizerBase,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 1.0,
    source: str = "text",
    seed: int = 0,
) -> list[BenchRequest]:
    """Prompts of random tokens; source "ids" draws any non-special token, "text" only whole words."""
    rng = random.Random(seed)
    pool = _word_ids(tokenizer) if source == "text" else _allowed_ids(tokenizer)
    in_lens = _lengths(rng, num_prompts, input_len, range_ratio)
    out_lens = _lengths(rng, num_prompts, output_len, range_ratio)
    out = []
    for n, m in zip(in_lens, out_lens):
        ids = [rng.choice(pool) for _ in range(n)]
        out.append(BenchRequest(tokenizer.decode(ids), ids, m))
    return out


def shared_prefix_requests(
    tokenizer: PreTrainedTokenizerBase,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    seed: int = 0,
) -> list[BenchRequest]:
    """Groups of prompts that share one long system prompt, each with its own question; groups interleave, shuffled."""
    rng = random.Random(seed)
    words = _word_ids(tokenizer)
    out = []
    for _ in range(num_groups):
        system = [rng.choice(words) for _ in range(system_prompt_len)]
        for _ in range(prompts_per_group):
            ids = system + [rng.choice(words) for _ in range(question_len)]
            out.append(BenchRequest(tokenizer.decode(ids), ids, output_len))
    rng.shuffle(out)
    return out
