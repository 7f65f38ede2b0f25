"""`kiln bench <name>` reaches each benchmark's own argument parser."""

import pytest

from kiln.serving.cli import main


@pytest.mark.parametrize("name, prog", [("serve", "kiln bench serve"), ("offline", "kiln bench offline"), ("one-batch", "kiln bench one-batch"), ("startup", "kiln bench startup"), ("cpu-attention", "kiln bench cpu-attention"), ("dp-routing", "kiln bench dp-routing")])
def test_bench_dispatches_to_the_benchmark(name: str, prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", name, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog}")


def test_unknown_benchmark_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nope"]) == 2
    assert "kiln bench {serve,offline,one-batch,startup,moe,cpu-attention,dp-routing}" in capsys.readouterr().err
