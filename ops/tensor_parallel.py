"""Tensor parallelism's coordinates: which rank of how many, and the process group its collectives run on.

The engine builds one per process and passes it down to the model and the KV pool; with size 1 (the
default) every layer is whole and no collective runs.
"""

from dataclasses import dataclass

from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: ProcessGroup | None = None  # None when size == 1

    def local_heads(self, num_heads: int) -> int:
        """Query heads this rank computes (the head count must divide evenly)."""
        if num_heads % self.size:
            raise ValueError(f"{num_heads} attention heads do not split over {self.size} tensor-parallel ranks")
        return num_heads // self.size

    def local_kv_heads(self, num_kv_heads: int) -> int:
        """KV heads this rank holds: a share of them, or one replicated head when there are fewer than ranks."""
        if num_kv_heads >= self.size:
            if num_kv_heads % self.size:
                raise ValueError(f"{num_kv_heads} KV heads do not split over {self.size} tensor-parallel ranks")
            return num_kv_heads // self.size
        if self.size % num_kv_heads:
            raise ValueError(f"{self.size} tensor-parallel ranks cannot share {num_kv_heads} KV heads evenly")
        return 1
