"""ServerArgs from the command line: the data-parallel flags' defaults and bounds."""

import pytest

from kiln.serving.server_args import ServerArgs


def test_dp_size_defaults_to_one_engine():
    assert ServerArgs.from_cli([]).dp_size == 1
    assert ServerArgs.from_cli(["--dp-size", "3"]).dp_size == 3


@pytest.mark.parametrize("value", ["0", "-2"])
def test_dp_size_below_one_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exc:
        ServerArgs.from_cli(["--dp-size", value])
    assert exc.value.code == 2
    assert f"--dp-size must be at least 1 (got {value})" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--dp-size must be at least 1"):
        ServerArgs(dp_size=int(value))


def test_load_balance_method_defaults_to_cache_aware():
    assert ServerArgs.from_cli([]).load_balance_method == "cache_aware"
    assert ServerArgs.from_cli(["--load-balance-method", "shortest_queue"]).load_balance_method == "shortest_queue"
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--load-balance-method", "round_robin"])


def test_compile_workers_default_to_the_machine_and_refuse_a_negative_count(capsys: pytest.CaptureFixture[str]):
    assert ServerArgs.from_cli([]).compile_workers is None
    assert ServerArgs.from_cli(["--compile-workers", "0"]).compile_workers == 0
    with pytest.raises(SystemExit) as exc:
        ServerArgs.from_cli(["--compile-workers", "-1"])
    assert exc.value.code == 2
    assert "--compile-workers must be 0 or more (got -1)" in capsys.readouterr().err
