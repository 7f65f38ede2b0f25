"""Turning streamed token ids back into text."""

from typing import Any

from kiln.serving.messages import FinishReason, FinishStop

# Prompt tokens decoded alongside the output, so that tokenizers which drop a
# leading space at the start of a decode (SentencePiece) get it right.
PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Text of a growing id sequence, emitted only once it is complete UTF-8.

    Each step decodes a short window twice (with and without the newest ids)
    and keeps the difference, so cost stays constant per token.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool, spaces_between_special_tokens: bool):
        self.tok = tokenizer
        self.kw = {"skip_special_tokens": skip_special_tokens, "spaces_between_special_tokens": spaces_between_special_tokens}
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, new_ids: list[int], final: bool = False) -> str:
        """Appends ids; returns the text added (held back while a character is incomplete)."""
        self.ids += new_ids
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], **self.kw)
        full = self.tok.decode(self.ids[self.prefix_offset :], **self.kw)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        added = full[len(prefix) :]
        self.text += added
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return added


def trim_stop(text: str, finish_reason: FinishReason | None, no_stop_trim: bool) -> str:
    """Cuts the text at a matched stop string, as SGLang returns it."""
    if no_stop_trim or not isinstance(finish_reason, FinishStop) or not isinstance(finish_reason.matched, str):
        return text
    pos = text.find(finish_reason.matched)
    return text[:pos] if pos >= 0 else text
