"""OpenAI's logprob layouts, built from the native [logprob, token_id, text] triples of meta_info."""

from typing import Any

Triple = list[Any]  # [logprob or None, token_id, token_text]


def completion_logprobs(tokens: list[Triple], tops: list[list[Triple]], offset: int) -> dict[str, Any]:
    """/v1/completions: parallel lists; text_offset counts characters from `offset`, token by token."""
    offsets = []
    for _, _, text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": [t[2] for t in tokens],
        "token_logprobs": [t[0] for t in tokens],
        # The first prompt token has no logprob, hence no alternatives either.
        "top_logprobs": [None if t[0] is None else {alt[2]: alt[0] for alt in top} for t, top in zip(tokens, tops)],
        "text_offset": offsets,
    }


def _entry(triple: Triple) -> dict[str, Any]:
    logprob, _, text = triple
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokens: list[Triple], tops: list[list[Triple]]) -> dict[str, Any]:
    """/v1/chat/completions: one entry per output token, with its top alternatives."""
    return {"content": [_entry(t) | {"top_logprobs": [_entry(a) for a in top]} for t, top in zip(tokens, tops)]}
