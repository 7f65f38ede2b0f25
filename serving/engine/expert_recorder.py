"""The expert distribution recorder (SGLang's `stat` mode): how many tokens each layer routed to each expert.

The counting itself happens inside the compiled forward: every MoE layer's
`kiln::moe` adds its real tokens' choices into that layer's `expert_counts`
buffer, every step, recorder or not (a bincount of a step's routing; nothing to
turn off). The recorder only decides which span of those counts a dump covers:
`start` zeroes the buffers, `stop` freezes a copy, `dump` writes the counts
(frozen if stopped, live otherwise) and starts over from zero.
"""

import csv
import logging
import time
from pathlib import Path

import torch
from torch import nn

from kiln.models.moe import SparseMoE

log = logging.getLogger(__name__)

DISABLED = "Please set ServerArgs.expert_distribution_recorder_mode to use ExpertDistributionRecorder."


class ExpertRecorder:
    def __init__(self, model: nn.Module, out_dir: Path):
        layers = getattr(model, "layers", [])
        # Layer index of each MoE block: dense layers (Qwen2-MoE's mlp_only_layers) keep rows of zeros.
        self.layers = [(i, layer.mlp) for i, layer in enumerate(layers) if isinstance(getattr(layer, "mlp", None), SparseMoE)]
        if not self.layers:
            raise ValueError(f"--expert-distribution-recorder-mode needs a mixture-of-experts model; {type(model).__name__} has no experts")
        self.num_layers, self.num_experts = len(layers), self.layers[0][1].expert_counts.shape[0]
        self.out_dir = out_dir
        self.recording = False
        self.frozen: torch.Tensor | None = None

    def start(self) -> None:
        if self.recording:
            log.warning("already recording expert ids: the counts so far are dropped (dump them with /dump_expert_distribution_record first)")
        self._reset()
        self.recording = True

    def stop(self) -> None:
        if not self.recording:
            log.warning("stop_expert_distribution_record while not recording (start with /start_expert_distribution_record)")
            return
        self.frozen = self._read()
        self.recording = False

    def dump(self) -> Path:
        """Writes `expert_distribution_recorder_<time>.pt` ({"rank": 0, "logical_count": int64 [layers, experts]})
        and a CSV beside it (layer_id,expert_id,count), then starts the counts over."""
        if self.recording:
            counts = self._read()
        elif self.frozen is not None:
            counts = self.frozen
        else:  # not started since the last dump: nothing recorded
            counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"expert_distribution_recorder_{time.time()}.pt"
        torch.save({"rank": 0, "logical_count": counts}, path)
        with path.with_suffix(".csv").open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["layer_id", "expert_id", "count"])
            for layer in range(self.num_layers):
                out.writerows([layer, e, int(c)] for e, c in enumerate(counts[layer]))
        log.info("wrote the expert distribution to %s", path)
        self._reset()
        return path

    def _read(self) -> torch.Tensor:
        counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64)
        for i, block in self.layers:
            counts[i] = block.expert_counts.cpu()
        return counts

    def _reset(self) -> None:
        for _, block in self.layers:
            block.expert_counts.zero_()
        self.frozen = None
