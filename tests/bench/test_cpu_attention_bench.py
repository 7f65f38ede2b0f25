"""`kiln bench cpu-attention` on tiny shapes: both kernels agree before timing, and the fields it writes."""

import json

from kiln.bench import cpu_attention


def test_writes_both_kernels_times_and_the_bandwidth(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cpu_attention, "memory_bandwidth", lambda: 10e9)  # a 1 GiB sum is not what this test checks
    out = tmp_path / "r.json"
    argv = ["--batch-sizes", "1,3", "--context", "40", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--rounds", "1", "--seconds", "0.01"]
    assert cpu_attention.main([*argv, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "cpu_attention" and r["read_gbs"] == 10.0
    assert [x["batch"] for x in r["results"]] == [1, 3]
    for x in r["results"]:
        assert x["sdpa_ms"] > 0 and x["in_place_ms"] > 0
        assert x["in_place_kv_gbs"] == 2 * x["batch"] * 40 * 2 * 16 * 2 / x["in_place_ms"] / 1e6
    assert "batch   3 x 40 tokens: gather + SDPA" in capsys.readouterr().out
