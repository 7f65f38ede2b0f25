"""Loading the tokenizer, the same way on both sides of the pipe.

transformers' fast tokenizer class does not import torch (AutoTokenizer does, through the model
configs), which keeps the HTTP process free of it; a checkpoint without a `tokenizer.json` falls
back to AutoTokenizer, which can convert a slow tokenizer.
"""

from typing import Any


def import_tokenizer_classes() -> None:
    """Imports what load_tokenizer uses (about a second), for a process with time to spare before it knows the path."""
    from transformers import PreTrainedTokenizerFast  # noqa: F401


def load_tokenizer(path: str) -> Any:
    """A transformers tokenizer (PreTrainedTokenizerBase) for a folder or hub id."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
