"""The transformers peer's streamer: each row feeds its own request until that request has its tokens."""

from pathlib import Path

import torch

from kiln.bench.hf_server import Job, RowStreamer
from kiln.models.loader import resolve_checkpoint
from kiln.serving.server_args import ServerArgs
from kiln.serving.tokenizer import load_tokenizer


def drain(job: Job) -> list:
    out = []
    while not job.out.empty():
        out.append(job.out.get_nowait())
    return out


def test_rows_stream_to_their_jobs_and_finish_at_their_own_length() -> None:
    tok = load_tokenizer(str(resolve_checkpoint(None, Path(ServerArgs().cache_dir))))
    short, long = Job([1, 2], max_new_tokens=2), Job([3], max_new_tokens=3)
    s = RowStreamer([short, long], tok)
    s.put(torch.tensor([[0, 1, 2], [0, 0, 3]]))  # the prompt: ignored
    ids = tok(" The cat sat on", add_special_tokens=False).input_ids
    for step in range(3):
        s.put(torch.tensor([ids[step], ids[step + 1]]))
    assert drain(short) == [1, 2, tok.decode(ids[:2])]
    assert drain(long) == [1, 2, 3, tok.decode(ids[1:4])]
