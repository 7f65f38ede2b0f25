"""Bucket sets and Inductor settings, read from a TOML profile (profiles/<device>.toml)."""

import bisect
import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILES = Path(__file__).resolve().parent.parent / "profiles"


@dataclass(frozen=True)
class Profile:
    decode_batch_sizes: tuple[int, ...]
    prefill_token_counts: tuple[int, ...]
    chunked_prefill_size: int
    inductor: dict[str, Any] = field(default_factory=dict)
    # On CUDA, prefill buckets up to this many tokens also get piecewise CUDA graphs.
    piece_graph_max_tokens: int = 0
    # Quantized linears run batches of at least this many rows on a float32 copy of their weights (0: never).
    quantized_dense_from_rows: int = 0
    source: str = ""  # the file's text, part of the compile-cache key
    # Pieces of buckets up to `small_bucket_tokens` tokens are compiled with these settings over `inductor`'s.
    small_bucket_tokens: int = 0
    small_bucket_inductor: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Profile":
        text, data = _read(path)
        b = data["buckets"]
        decode, prefill = sorted(b["decode_batch_sizes"]), sorted(b["prefill_token_counts"])
        if min(decode + prefill) < 1:
            raise ValueError(f"{path}: bucket sizes must be at least 1")
        small = dict(data.get("small_buckets", {}))
        return cls(
            tuple(decode), tuple(prefill), int(b["chunked_prefill_size"]), dict(data.get("inductor", {})),
            int(b.get("piece_graph_max_tokens", 0)), int(data.get("quantized", {}).get("dense_from_rows", 0)), text,
            int(small.get("max_tokens", 0)), dict(small.get("inductor", {})),
        )  # fmt: skip

    def inductor_for(self, tokens: int) -> dict[str, Any]:
        """The Inductor settings for the pieces of a bucket of `tokens` tokens."""
        if tokens <= self.small_bucket_tokens:
            return {**self.inductor, **self.small_bucket_inductor}
        return self.inductor

    @classmethod
    def for_device(cls, device_type: str, override: str | None = None) -> "Profile":
        return cls.load(Path(override) if override else PROFILES / f"{device_type}.toml")

    def narrowed(self, max_decode_batch: int | None) -> "Profile":
        if not max_decode_batch:
            return self
        kept = tuple(s for s in self.decode_batch_sizes if s <= max_decode_batch) or self.decode_batch_sizes[:1]
        return dataclasses.replace(self, decode_batch_sizes=kept, source=self.source + f"\n#max_bs={max_decode_batch}")


def _read(path: Path) -> tuple[str, dict[str, Any]]:
    """The profile's text (with its base's, for the cache key) and its settings: a `base = "other.toml"`
    profile (beside it) takes the base's tables and overrides the keys it sets."""
    text = path.read_text()
    data = tomllib.loads(text)
    if "base" not in data:
        return text, data
    base_text, merged = _read(path.parent / data.pop("base"))
    for table, values in data.items():
        merged[table] = {**merged.get(table, {}), **values}
    return base_text + text, merged


def pick(sizes: tuple[int, ...], n: int) -> int | None:
    """The smallest bucket holding n, or None when n is above them all."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None
