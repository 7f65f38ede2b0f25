"""The serving benchmark's picture: output throughput against concurrency, and latency percentiles, per peer."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def plot_serve(result: dict[str, Any], path: Path) -> None:
    peers = list(dict.fromkeys(r["peer"] for r in result["runs"]))
    panels = [("output tok/s", None), ("TTFT ms", "ttft"), ("ITL ms", "itl"), ("E2E latency ms", "e2e")]
    fig, grid = plt.subplots(2, 2, figsize=(11, 8))
    axes = list(grid.flat)
    levels = sorted({r["concurrency"] for r in result["runs"] if r["concurrency"]})
    for ax, (title, key) in zip(axes, panels):
        for i, peer in enumerate(peers):
            runs = [r for r in result["runs"] if r["peer"] == peer and r["concurrency"]]
            xs = [r["concurrency"] for r in runs]
            colour = f"C{i}"
            if key is None:
                ax.plot(xs, [r["metrics"]["output_tok_s"] for r in runs], "o-", color=colour, label=peer)
                continue
            ax.plot(xs, [r["metrics"][key]["median_ms"] for r in runs], "o-", color=colour, label=f"{peer} median")
            ax.plot(xs, [r["metrics"][key]["p99_ms"] for r in runs], "x--", color=colour, label=f"{peer} p99")
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("max concurrency")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{result['date']}  {result['machine']['cpu']} x{result['machine']['cpus']}  {result['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
