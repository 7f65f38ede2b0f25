"""The token-slot KV pool: one slot per token, and the table of each request's slots."""

import torch
from torch import Tensor


class OutOfSlots(RuntimeError):
    pass


class KVPool:
    """K and V for every layer, plus a free list of slots and of request-table rows.

    Slot 0 is never handed out: padding rows write their K/V there.
    """

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_requests: int,
        max_context: int,
        zeroed: bool = False,
    ):
        shape = (num_layers, num_slots + 1, kv_heads, head_dim)
        # Left uninitialised (zeroing a large pool takes seconds): every slot a
        # request table names is written in the step that allocates it, and
        # unwritten table entries name slot 0, the one slot zeroed here.
        # `zeroed` for overlapped steps: the CPU decode kernel reads (and masks) table entries past a row's
        # length, which the host may fill with the next step's new slot while a step runs, and a mask does not
        # cancel a NaN that uninitialised memory may hold.
        new = torch.zeros if zeroed else torch.empty
        self.k = new(shape, dtype=dtype, device=device)
        self.v = new(shape, dtype=dtype, device=device)
        self.k[:, 0].zero_()
        self.v[:, 0].zero_()
        self.req_to_token = torch.zeros(max_requests, max_context, dtype=torch.int32, device=device)
        self.size = num_slots
        # The free list is a stack in a fixed array, so alloc and free cost O(n) in the slots they
        # move, not in the pool (a torch.cat of the whole list took 20 ms per free at 5M slots).
        # The next slot to hand out is _stack[_top - 1], so the list reads back to front: N..1 at
        # first hands out 1, 2, 3, ...
        self._stack = torch.arange(num_slots, 0, -1, dtype=torch.int64)
        self._top = num_slots
        self._free_rows = list(range(max_requests - 1, -1, -1))
        # With tensor parallelism, rank 0 records every table write here and sends them with the next step,
        # so that the other ranks' tables (which their attention reads) match its own.
        self.table_writes: list[Tensor] | None = None

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def free_slots(self) -> int:
        return self._top

    @property
    def _free_slots(self) -> Tensor:
        """The free slots (a view, last one handed out first), for tests that audit the pool."""
        return self._stack[: self._top]

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int:
        if not self._free_rows:
            raise OutOfSlots("no free request rows")
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def alloc_slots(self, row: int, start: int, n: int) -> Tensor:
        """Hands out n slots and records them as positions [start, start+n) of the row."""
        if n > self._top:
            raise OutOfSlots(f"asked for {n} slots, {self._top} free")
        # flip copies: the caller's slots must not alias stack entries a later free overwrites.
        slots = self._stack[self._top - n : self._top].flip(0)
        self._top -= n
        self.set_slots(row, start, slots)
        return slots

    def slots_of(self, row: int, start: int, end: int) -> Tensor:
        return self.req_to_token[row, start:end].to("cpu", torch.int64)

    def set_slots(self, row: int, start: int, slots: Tensor) -> None:
        self.req_to_token[row, start : start + len(slots)] = slots.to(self.req_to_token.device, torch.int32)
        if self.table_writes is not None:
            self.table_writes.append(torch.cat([torch.tensor([row, start, len(slots)]), slots.to("cpu", torch.int64)]))

    def take_table_writes(self) -> Tensor:
        """The table writes recorded since the last call, as (row, start, n, n slots) runs back to back."""
        writes, self.table_writes = self.table_writes or [], []
        return torch.cat(writes) if writes else torch.zeros(0, dtype=torch.int64)

    def apply_table_writes(self, writes: Tensor) -> None:
        """Replays another rank's take_table_writes() on this table."""
        at, flat = 0, writes.tolist()
        while at < len(flat):
            row, start, n = flat[at : at + 3]
            self.req_to_token[row, start : start + n] = writes[at + 3 : at + 3 + n].to(self.req_to_token.device, torch.int32)
            at += 3 + n

    def free(self, slots: Tensor) -> None:
        # Freed slots go on top, handed out next and in the order given: the next requests reuse
        # memory already touched (and cached) instead of spreading over pages never written. On
        # the CPU, first touches of a large pool made decode steps 1.5x slower.
        n = len(slots)
        if self._top + n > self.size:
            raise ValueError(f"freeing {n} slots with {self._top} of {self.size} already free: a double free")
        self._stack[self._top : self._top + n] = slots.to("cpu", torch.int64).flip(0)
        self._top += n
