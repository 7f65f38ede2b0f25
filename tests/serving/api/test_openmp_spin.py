"""The engine process's OpenMP spin count: Kiln's default unless the user set libgomp's own variables."""

import os

import pytest

from kiln.serving.api.engine_client import set_openmp_spin
from kiln.serving.server_args import ServerArgs


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    return monkeypatch


def test_the_engine_spins_as_the_flag_says(clean_env):
    set_openmp_spin(ServerArgs(omp_spin_count=1234))
    assert os.environ["GOMP_SPINCOUNT"] == "1234"


@pytest.mark.parametrize("name, value", [("OMP_WAIT_POLICY", "PASSIVE"), ("GOMP_SPINCOUNT", "7")])
def test_a_users_own_setting_wins(clean_env, name, value):
    clean_env.setenv(name, value)
    set_openmp_spin(ServerArgs(omp_spin_count=1234))
    assert os.environ[name] == value
    assert os.environ.get("GOMP_SPINCOUNT") == (value if name == "GOMP_SPINCOUNT" else None)
