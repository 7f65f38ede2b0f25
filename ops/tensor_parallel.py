"""Tensor parallelism's coordinates: which rank of how many, the process group its collectives run on, and which
part of each split dimension this rank holds.

The engine builds one per process and passes it down to the model and the KV pool; with size 1 (the
default) every layer is whole and no collective runs.

Attention splits in whole GQA groups (a KV head with the query heads that read it), as evenly as the groups
allow: SmolLM2-135M's 3 KV heads (9 query heads) over 2 ranks are 2 + 1 groups, so ranks may hold different
head counts, and so KV pools of different widths (the slot count must still agree). With fewer KV heads than
ranks, each KV head is replicated on the ranks that share its group's query heads.
"""

from dataclasses import dataclass

from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: ProcessGroup | None = None  # None when size == 1

    def split(self, n: int) -> range:
        """This rank's contiguous share of n items (the first ranks get one less when n does not divide)."""
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def kv_head_range(self, num_kv_heads: int) -> range:
        """The KV heads this rank holds: a share of them, or the one (replicated) head its query heads read."""
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads)
        if self.size % num_kv_heads:
            raise ValueError(f"{self.size} tensor-parallel ranks cannot share {num_kv_heads} KV heads evenly")
        return range(self.rank * num_kv_heads // self.size, self.rank * num_kv_heads // self.size + 1)

    def head_range(self, num_heads: int, num_kv_heads: int) -> range:
        """The query heads this rank computes: those of its KV heads' groups (a share of one group when
        KV heads are replicated, which needs the query heads to divide over the ranks)."""
        if self.size == 1:
            return range(num_heads)
        group = num_heads // num_kv_heads
        if num_kv_heads >= self.size:
            kv = self.kv_head_range(num_kv_heads)
            return range(kv.start * group, kv.stop * group)
        if num_heads % self.size:
            raise ValueError(f"{num_heads} attention heads do not split over {self.size} tensor-parallel ranks")
        return self.split(num_heads)

    def local_heads(self, num_heads: int, num_kv_heads: int | None = None) -> int:
        """Query heads this rank computes (num_kv_heads defaults to num_heads: plain multi-head attention)."""
        return len(self.head_range(num_heads, num_kv_heads or num_heads))

    def local_kv_heads(self, num_kv_heads: int) -> int:
        """KV heads this rank holds, hence the head count of its KV pool."""
        return len(self.kv_head_range(num_kv_heads))

    def vocab_range(self, vocab_size: int) -> range:
        """This rank's rows of the embedding and LM head: ceil(vocab / size) each (padded on the last rank, so
        that every rank's logits have one width for the all-gather), clipped to the real vocabulary."""
        per_rank = -(-vocab_size // self.size)
        return range(min(self.rank * per_rank, vocab_size), min((self.rank + 1) * per_rank, vocab_size))

    def vocab_rows(self, vocab_size: int) -> int:
        """Rows of each rank's embedding and LM head shard, padding included."""
        return -(-vocab_size // self.size)
