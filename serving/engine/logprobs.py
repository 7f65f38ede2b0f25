"""Logprobs of the model's own distribution, recorded on the request as its tokens are sampled or scored."""

import torch

from kiln.serving.engine.request import Req


def _scores(req: Req, logprobs: torch.Tensor, tokens: list[int]) -> tuple[list[float], list[list], list[list]]:
    """For rows of logprobs [n, vocab] and the token each row chose: its logprob, the top ones, the asked-for ones."""
    picked = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    tops: list[list] = [[] for _ in tokens]
    if req.logprob.top_n:
        values, ids = logprobs.topk(req.logprob.top_n, dim=-1)
        tops = [list(zip(v, t)) for v, t in zip(values.tolist(), ids.tolist())]
    wanted = req.logprob.token_ids or []
    asked = [list(zip(row, wanted)) for row in logprobs[:, wanted].tolist()] if wanted else [[] for _ in tokens]
    return picked, tops, asked


def record_logprobs(req: Req, logprobs: torch.Tensor, token: int) -> None:
    """Appends the logprobs of the request's newest output token (logprobs: [vocab])."""
    picked, tops, asked = _scores(req, logprobs[None], [token])
    req.token_logprobs += picked
    req.top_logprobs += tops
    req.ids_logprobs += asked


def record_input_logprobs(req: Req, logprobs: torch.Tensor, n: int) -> None:
    """Scores the prompt tokens that this step's rows (Req.input_rows, before kv_len advances) predict."""
    lo, hi = req.input_rows(n)
    picked, tops, asked = _scores(req, logprobs, req.input_ids[lo + 1 : hi + 1])
    req.input_logprobs += picked
    req.input_top_logprobs += tops
    req.input_ids_logprobs += asked
    req.input_lp_pos = hi
