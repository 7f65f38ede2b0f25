"""One parse of a GGUF's metadata while transformers converts it, instead of one per reader it opens.

transformers reads the file three times in one conversion (for the config, the weights and the tokenizer), and
gguf's reader spends seconds on each: it indexes the tokenizer's 49k strings and merges one numpy view at a
time (about 2/3 of SmolLM2's conversion). The file does not change in between, so the readers can be one.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import gguf


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within the block, `gguf.GGUFReader(path)` returns one reader per file (transformers imports the name from
    gguf at each call, so replacing it there reaches every reader it opens)."""
    reader_class = gguf.GGUFReader
    opened = cache(lambda path, mode: reader_class(path, mode))

    def reader(path: Any, mode: str = "r") -> Any:
        return opened(os.path.realpath(path), mode)

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = reader_class
