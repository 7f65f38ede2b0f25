"""Replacing the served weights with a checkpoint's, in place: the parameters keep their storage, so compiled
pieces and captured CUDA graphs (which hold pointers to it) stay valid, and nothing is recompiled.

The checkpoint is checked whole first (its architecture, then every tensor's name and shape, from the
files' headers), so a wrong checkpoint leaves the old weights untouched. Only a failure while copying
(a file that cannot be read) needs the old checkpoint read back.
"""

import logging
import time
from pathlib import Path

from torch import nn

from kiln.models.dummy import init_dummy_weights
from kiln.models.loader import read_config, resolve_checkpoint
from kiln.models.registry import model_class
from kiln.models.weights import check_weights, iter_weights, weight_files
from kiln.serving.engine.step_channel import StepChannel

log = logging.getLogger(__name__)

SUCCESS = "Succeeded to update model weights."
LOAD_FORMATS = (None, "auto", "safetensors", "gguf")


def _reason(exc: BaseException) -> str:
    # A KeyError's str() wraps its message in quotes.
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


class WeightUpdater:
    def __init__(
        self, model: nn.Module, checkpoint: Path, cache_dir: Path, is_embedding: bool, quantization: str = "none", dummy_seed: int | None = None,
        channel: StepChannel | None = None,
    ):
        self.model = model
        self.quantization = quantization
        self.checkpoint = checkpoint  # the folder the served weights came from
        self.dummy_seed = dummy_seed  # set while the served weights are dummy ones, which this seed makes again
        self.cache_dir = cache_dir
        self.is_embedding = is_embedding
        self.channel = channel  # with tensor parallelism: every rank updates its shard, or none does

    def update(self, model_path: str, load_format: str | None) -> tuple[bool, str]:
        """(success, message) with SGLang's messages; on failure the served weights are the old ones.
        With tensor parallelism, rank 0 first tells the others, which call this too."""
        if self.channel is not None and self.channel.tp.rank == 0:
            self.channel.send_weights(model_path, load_format)
        before = (self.checkpoint, self.dummy_seed)
        ok, message = self._update(model_path, load_format)
        if self.channel is None or self.channel.all_ok(ok) or not ok:
            return ok, message
        log.error("update_weights_from_disk: another tensor-parallel rank failed; reading back %s", before[0])
        self.checkpoint, self.dummy_seed = before
        self._read_back()
        return False, "Failed to update weights: another tensor-parallel rank could not load them.\nRolling back to original weights."

    def _update(self, model_path: str, load_format: str | None) -> tuple[bool, str]:
        t0 = time.monotonic()
        if load_format not in LOAD_FORMATS:
            return False, f"Unknown load_format: {load_format}"
        try:
            folder = resolve_checkpoint(model_path, self.cache_dir)
            cfg = read_config(folder)
            weight_files(folder)
        except Exception as exc:
            log.error("update_weights_from_disk: %s", exc)
            return False, f"Failed to get weights iterator: {_reason(exc)}."
        try:
            if self.quantization != "none":
                raise ValueError(f"the served linears are quantized ({self.quantization}); start the server with --torchao-config none to update weights")
            served, new = type(self.model), model_class(cfg, self.is_embedding)
            if new is not served:
                raise ValueError(f"the checkpoint is a {cfg.architectures[0]} ({new.__name__}) but the server runs {served.__name__}")
            check_weights(self.model, folder)
        except Exception as exc:
            log.error("update_weights_from_disk: %s", exc)
            return False, f"Failed to update weights: {_reason(exc)}.\nRolling back to original weights."
        try:
            self.model.load_weights(iter_weights(folder))
        except Exception as exc:
            log.error("update_weights_from_disk failed while copying (%s); reading back %s", exc, self.checkpoint)
            self._read_back()
            return False, f"Failed to update weights: {_reason(exc)}.\nRolling back to original weights."
        self.checkpoint, self.dummy_seed = folder, None
        log.info("Update weights end: now serving %s (%.2fs)", folder, time.monotonic() - t0)
        return True, SUCCESS

    def _read_back(self) -> None:
        """The old weights again, after a failed copy; a failure here leaves no weights to serve."""
        if self.dummy_seed is not None:
            init_dummy_weights(self.model, self.dummy_seed)
        else:
            self.model.load_weights(iter_weights(self.checkpoint))
