"""The checks one engine request must pass: the HTTP side runs them before sending it, the engine again at admission.

Both sides import this module (it needs neither torch nor the tokenizer), so a request the HTTP side lets
through and the engine refuses is a bug on one side, never two rule sets drifting apart.
"""

from kiln.serving.messages import GenerateRequest, RequestLimits
from kiln.serving.sampling_params import InvalidRequest, SamplingParams


def check_ids(ids: list[int], vocab_size: int, name: str = "input_ids") -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise InvalidRequest(f"{name} holds token id {t}, outside the vocabulary [0, {vocab_size}).")


def check_length(ids: list[int], max_new_tokens: int, limits: RequestLimits) -> None:
    """The prompt, and the prompt with its output, against the context, the pool and (pooled models) one forward."""
    if not ids:
        raise InvalidRequest("The input is empty: it tokenizes to no tokens.")
    ctx = limits.context_length
    if limits.kind != "generation":
        if len(ids) > limits.max_pooled_tokens:
            raise InvalidRequest(
                f"The input ({len(ids)} tokens) is longer than the {limits.max_pooled_tokens} tokens this server embeds in one "
                "forward (the model's context length, and --chunked-prefill-size)."
            )
        if len(ids) > limits.max_total_tokens:
            raise InvalidRequest(f"The input needs {len(ids)} KV cache tokens but the server holds only {limits.max_total_tokens} (--max-total-tokens).")
        return
    if len(ids) >= ctx:
        raise InvalidRequest(f"The input ({len(ids)} tokens) is longer than the model's context length ({ctx} tokens).")
    total = len(ids) + max_new_tokens
    if total > ctx:
        raise InvalidRequest(
            f"Requested token count exceeds the model's maximum context length of {ctx} tokens. "
            f"You requested a total of {total} tokens: {len(ids)} tokens from the input messages and "
            f"{max_new_tokens} tokens for the completion. Please reduce the number of tokens in the input "
            "messages or the completion to fit within the limit."
        )
    if total > limits.max_total_tokens:
        raise InvalidRequest(
            f"The request needs {total} KV cache tokens but the server holds only {limits.max_total_tokens} (--max-total-tokens)."
        )


def check_request(req: GenerateRequest, limits: RequestLimits) -> None:
    """Everything an engine request carries: ids, lengths, sampling parameters, logprob options."""
    check_ids(req.input_ids, limits.vocab_size)
    params: SamplingParams = req.params
    params.validate(limits.vocab_size)
    if not limits.has_tokenizer:
        for name in ("stop", "stop_regex", "json_schema", "regex", "ebnf"):
            if getattr(params, name) is not None:
                raise InvalidRequest(f"{name} needs the tokenizer, which this server skips (--skip-tokenizer-init).")
    check_length(req.input_ids, params.max_new_tokens if limits.kind == "generation" else 0, limits)
    lp = req.logprob
    if lp is None:
        return
    if not -1 <= lp.start_len < len(req.input_ids):
        raise InvalidRequest(
            f"logprob_start_len ({lp.start_len}) must be -1 (no input logprobs) or a position of the "
            f"{len(req.input_ids)}-token input."
        )
    if not 0 <= lp.top_n <= limits.vocab_size:
        raise InvalidRequest(f"top_logprobs_num must be in [0, {limits.vocab_size}], got {lp.top_n}.")
    check_ids(lp.token_ids or [], limits.vocab_size, "token_ids_logprob")
