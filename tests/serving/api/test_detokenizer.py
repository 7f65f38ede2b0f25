"""Incremental detokenizing gives exactly the full decode, multi-byte characters included."""

import pytest
from transformers import AutoTokenizer

from kiln.models.loader import default_model_path, resolve_checkpoint
from kiln.serving.api.detokenizer import IncrementalDetokenizer, trim_stop
from kiln.serving.messages import FinishStop


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from pathlib import Path

    return AutoTokenizer.from_pretrained(resolve_checkpoint(str(default_model_path()), Path.home() / ".cache" / "kiln"))


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "naïve café — 東京 🚀🎉 done", "<|im_start|>user\nhi<|im_end|>", "  spaces\n\n\ttabs  "],
)
@pytest.mark.parametrize("skip_special", [True, False])
def test_one_token_at_a_time_equals_full_decode(tok, text, skip_special):
    prompt = tok("Prompt:").input_ids
    ids = tok(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok, prompt, skip_special, True)
    pieces = []
    for i, t in enumerate(ids):
        piece = detok.add([t], final=i == len(ids) - 1)
        assert "\ufffd" not in piece, "a half character must be held back"
        pieces.append(piece)
    assert "".join(pieces) == detok.text == tok.decode(ids, skip_special_tokens=skip_special)


def test_trim_stop_cuts_at_the_matched_string_only():
    reason = FinishStop("END")
    assert trim_stop("abc END tail", reason, no_stop_trim=False) == "abc "
    assert trim_stop("abc END tail", reason, no_stop_trim=True) == "abc END tail"
    assert trim_stop("abc", FinishStop(2), no_stop_trim=False) == "abc"
