"""Compile workers' sharing: every unit is done once, by whoever claims it first; a worker that fails is logged
and leaves its units to the server's process."""

import logging
import threading
import time

import torch

from kiln.compiler.compile_workers import Workers, WorkSpec, do_units
from kiln.compiler.profile import Profile

UNITS = [("decode", 9, 64), *(("bucket", size) for size in (1, 2, 4, 8, 16, 32, 64, 128))]


def test_two_claimants_split_the_units_without_doing_one_twice(tmp_path):
    done: dict[str, list] = {"a": [], "b": []}

    def claimant(name: str) -> None:
        def run(unit) -> None:
            done[name].append(unit)
            time.sleep(0.01)  # a unit takes time: the other claimant moves on meanwhile

        do_units(UNITS, run, tmp_path)

    threads = [threading.Thread(target=claimant, args=(name,)) for name in done]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(done["a"] + done["b"]) == sorted(UNITS)
    assert done["a"] and done["b"], "both claimants got work"
    assert do_units(UNITS, lambda unit: None, tmp_path) == 0, "every unit stays claimed"
    assert do_units(UNITS, lambda unit: None, None) == len(UNITS), "without claims a process does every unit"


def test_a_failed_worker_is_logged_and_its_claims_removed(tmp_path, caplog):
    """No saved trace in the cache folder: the worker exits with an error, before claiming a unit."""
    spec = WorkSpec(tmp_path, Profile.for_device("cpu"), UNITS, kv_heads=3, kv_dtype=torch.float32)
    workers = Workers(spec, 1)
    with caplog.at_level(logging.WARNING, logger="kiln.compiler.compile_workers"):
        workers.wait()
    assert "a compile worker exited with 1" in caplog.text
    assert not workers.claims.exists()
