"""The dataset generators: the same seed gives the same prompts, lengths stay in range, groups share their prefix."""

from pathlib import Path

import pytest

from kiln.bench.datasets import random_requests, shared_prefix_requests
from kiln.models.loader import resolve_checkpoint
from kiln.serving.server_args import ServerArgs
from kiln.serving.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(resolve_checkpoint(None, Path(ServerArgs().cache_dir))))


@pytest.mark.parametrize("source", ["ids", "text"])
def test_random_is_deterministic_and_in_range(tokenizer, source: str) -> None:
    a = random_requests(tokenizer, 20, input_len=64, output_len=32, range_ratio=0.5, source=source, seed=7)
    b = random_requests(tokenizer, 20, input_len=64, output_len=32, range_ratio=0.5, source=source, seed=7)
    c = random_requests(tokenizer, 20, input_len=64, output_len=32, range_ratio=0.5, source=source, seed=8)
    assert a == b
    assert [r.prompt_ids for r in a] != [r.prompt_ids for r in c]
    assert all(32 <= len(r.prompt_ids) <= 64 and 16 <= r.output_len <= 32 for r in a)
    assert len({len(r.prompt_ids) for r in a}) > 1  # lengths vary
    special = set(tokenizer.all_special_ids)
    assert not any(set(r.prompt_ids) & special for r in a)
    assert all(r.prompt == tokenizer.decode(r.prompt_ids) for r in a)


def test_text_source_reads_as_words_and_retokenizes_to_its_ids(tokenizer) -> None:
    reqs = random_requests(tokenizer, 5, input_len=40, output_len=8, source="text", seed=1)
    for r in reqs:
        assert len(r.prompt_ids) == 40
        assert all(w.isalpha() for w in r.prompt.split())
        assert tokenizer(r.prompt, add_special_tokens=False).input_ids == r.prompt_ids


def test_shared_prefix_groups(tokenizer) -> None:
    reqs = shared_prefix_requests(tokenizer, num_groups=3, prompts_per_group=4, system_prompt_len=50, question_len=10, output_len=16, seed=3)
    assert reqs == shared_prefix_requests(tokenizer, num_groups=3, prompts_per_group=4, system_prompt_len=50, question_len=10, output_len=16, seed=3)
    assert len(reqs) == 12 and all(len(r.prompt_ids) == 60 and r.output_len == 16 for r in reqs)
    groups: dict[tuple[int, ...], int] = {}
    for r in reqs:
        key = tuple(r.prompt_ids[:50])
        groups[key] = groups.get(key, 0) + 1
    assert sorted(groups.values()) == [4, 4, 4]
    assert len({tuple(r.prompt_ids) for r in reqs}) == 12  # the questions differ
