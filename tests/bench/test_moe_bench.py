"""`kiln bench moe` on tiny shapes: the fields it prints and writes, a baseline that is the reference's
arithmetic, and a wrong op refused before it is timed."""

import json
from pathlib import Path

import pytest
import torch

from kiln.bench import moe as bench
from kiln.ops.moe_ref import moe_reference
from kiln.serving.cli import main as cli

TINY_LAYER = ["--tokens", "1,4", "--hidden", "64", "--intermediate", "32", "--experts", "8", "--top-k", "2", "--seconds", "0.05"]
TINY_MODEL = ["--batch-sizes", "1,2", "--input-len", "8", "--output-len", "4", "--no-compile"]


@pytest.mark.parametrize("renormalize", [False, True])
def test_loop_baseline_matches_the_reference(renormalize: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x, logits = torch.randn(5, 16, generator=gen), torch.randn(5, 6, generator=gen)
    w13, w2 = torch.randn(6, 16, 16, generator=gen), torch.randn(6, 16, 8, generator=gen)
    want = moe_reference(x, logits, w13, w2, 2, renormalize)
    torch.testing.assert_close(bench.loop_moe(x, logits, w13, w2, 2, renormalize), want)


def test_main_prints_and_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "moe.json"
    assert bench.main([*TINY_LAYER, *TINY_MODEL, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loop/op" in printed and "op GB/s" in printed and "decode ms/step" in printed
    r = json.loads(out.read_text())
    assert r["benchmark"] == "moe" and r["dtype"] == "float32"
    assert r["layer"] == {"hidden": 64, "intermediate": 32, "experts": 8, "top_k": 2, "renormalize": True}
    assert {"cpu", "torch"} <= r["machine"].keys() and "date" in r and "commit" in r["source"]
    assert [row["tokens"] for row in r["op"]] == [1, 4]
    per_expert_bytes = (2 * 32 * 64 + 64 * 32) * 4
    for row in r["op"]:
        assert row["max_abs_diff_vs_loop"] < 1e-4
        assert 1 <= row["experts_hit"] <= min(8, 2 * row["tokens"])
        assert row["expert_bytes_read"] == row["experts_hit"] * per_expert_bytes
        assert all(row[k] > 0 for k in ("op_ms", "compiled_ms", "loop_ms", "op_weight_gb_s"))
        assert row["loop_over_op"] == pytest.approx(row["loop_ms"] / row["op_ms"])
    model = r["model"]
    assert model["config"]["num_experts"] == 16 and (model["input_len"], model["output_len"]) == (8, 4)
    assert [(row["engine"], row["batch"]) for row in model["rows"]] == [("eager", 1), ("eager", 2)]
    for row in model["rows"]:
        assert row["decode_tok_s"] == pytest.approx(row["batch"] * 1000 / row["decode_step_ms"])


def test_a_wrong_op_is_refused_before_timing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = bench.moe
    monkeypatch.setattr(bench, "moe", lambda *a: real(*a) * 1.01)
    monkeypatch.setattr(bench, "memory_bandwidth", lambda: 1e10)
    with pytest.raises(AssertionError, match="kiln::moe differs from the loop at 1 tokens"):
        bench.main([*TINY_LAYER, *TINY_MODEL, "--out", str(tmp_path / "moe.json")])
    assert not (tmp_path / "moe.json").exists()


def test_kiln_bench_moe_reaches_its_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli(["bench", "moe", "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: kiln bench moe")
