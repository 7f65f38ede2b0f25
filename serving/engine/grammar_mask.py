"""The token bitmask of the constrained rows of a step: filled while the forward runs, applied after it.

A constrained row means a grammar was compiled, which imported xgrammar; the bitmask is made then."""

from concurrent.futures import Future, ThreadPoolExecutor

from torch import Tensor

from kiln.serving.engine.request import Req


class GrammarMask:
    def __init__(self, vocab_size: int, max_rows: int):
        self.bitmask: Tensor | None = None
        self.vocab_size, self.max_rows = vocab_size, max_rows
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")

    def start(self, reqs: list[Req]) -> Future[list[int]] | None:
        """Begins filling the bitmask rows of the constrained requests among reqs (the rows that sample)."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if not rows:
            return None
        if self.bitmask is None:
            import xgrammar as xgr

            self.bitmask = xgr.allocate_token_bitmask(self.max_rows, self.vocab_size)
        # The matchers depend only on the tokens accepted so far, so this overlaps the forward.
        return self.worker.submit(self._fill, reqs, rows)

    def _fill(self, reqs: list[Req], rows: list[int]) -> list[int]:
        for i in rows:
            reqs[i].grammar.fill_next_token_bitmask(self.bitmask, i)
        return rows

    def apply(self, logits: Tensor, pending: Future[list[int]], only: int | None = None) -> None:
        """In place: -inf on every token the grammar forbids, in the constrained rows only.

        With `only`, logits is that one row of the batch (sampled alone after a batched failure)."""
        import xgrammar as xgr

        rows = pending.result()
        if only is not None:
            if only in rows:
                row = self.bitmask[only : only + 1].to(logits.device, non_blocking=True)
                xgr.apply_token_bitmask_inplace(logits, row, vocab_size=self.vocab_size)
            return
        bitmask = self.bitmask[: logits.shape[0]].to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=rows)
