"""The output step: what each request's client hears after a step."""

from kiln.serving.engine.request import Req
from kiln.serving.messages import TokenOutput


def token_output(req: Req) -> TokenOutput:
    """The ids (and logprobs) the request produced since its last output, and its finish reason."""
    start, req.sent = req.sent, len(req.output_ids)
    out = TokenOutput(req.rid, req.output_ids[start:], len(req.input_ids), req.cached_tokens, req.finish_reason, req.retractions)
    if start == 0:
        out.queue_time = req.queue_time
    if req.logprob and start == 0 and (req.output_ids or req.finished):
        out.input_logprobs = req.input_logprobs
        out.input_top_logprobs = req.input_top_logprobs
        out.input_ids_logprobs = req.input_ids_logprobs
    if req.logprob:
        out.token_logprobs = req.token_logprobs[start:]
        out.top_logprobs = req.top_logprobs[start:]
        out.ids_logprobs = req.ids_logprobs[start:]
    return out
