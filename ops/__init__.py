"""Custom ops registered with torch.library; importing this package registers them."""

from kiln.ops.attention import AttentionMetadata, attention

__all__ = ["AttentionMetadata", "attention"]
