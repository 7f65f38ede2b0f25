"""The compile-cache key and the bucket profiles."""

import pytest
import torch
from torch._inductor.cpu_vec_isa import pick_vec_isa, valid_vec_isa_list

from kiln.compiler.cache import cache_key
from kiln.compiler.profile import PROFILES, Profile, pick

CPU = torch.device("cpu")


def test_every_factor_changes_the_key():
    profile = Profile.for_device("cpu")
    base = cache_key({"hidden_size": 64}, torch.float32, CPU, profile)
    assert cache_key({"hidden_size": 64}, torch.float32, CPU, profile) == base
    assert cache_key({"hidden_size": 65}, torch.float32, CPU, profile) != base
    assert cache_key({"hidden_size": 64}, torch.bfloat16, CPU, profile) != base
    assert cache_key({"hidden_size": 64}, torch.float32, CPU, profile.narrowed(8)) != base


def test_device_profiles_load_and_narrow():
    for device in ("cpu", "cuda"):
        p = Profile.for_device(device)
        assert list(p.decode_batch_sizes) == sorted(p.decode_batch_sizes) and min(p.decode_batch_sizes) >= 1
        assert p.chunked_prefill_size <= max(p.prefill_token_counts)
    narrowed = Profile.for_device("cuda").narrowed(32)
    assert max(narrowed.decode_batch_sizes) == 32


def test_the_throughput_profile_is_the_cpu_profile_with_float32_copies():
    cpu, fast = Profile.for_device("cpu"), Profile.load(PROFILES / "cpu-throughput.toml")
    assert cpu.quantized_dense_from_rows == 0 and fast.quantized_dense_from_rows == 32
    assert fast.decode_batch_sizes == cpu.decode_batch_sizes and fast.prefill_token_counts == cpu.prefill_token_counts
    assert fast.inductor == cpu.inductor and fast.chunked_prefill_size == cpu.chunked_prefill_size
    assert cache_key({}, torch.bfloat16, CPU, fast) != cache_key({}, torch.bfloat16, CPU, cpu)


def test_small_buckets_take_their_own_inductor_settings_over_the_profile_s():
    for name in ("cpu.toml", "cpu-throughput.toml"):
        p = Profile.load(PROFILES / name)
        small, large = p.inductor_for(p.small_bucket_tokens), p.inductor_for(p.small_bucket_tokens + 1)
        assert small == {**large, "cpp_wrapper": True} and "cpp_wrapper" not in large
        assert small["size_asserts"] is False and max(p.decode_batch_sizes) <= p.small_bucket_tokens < max(p.prefill_token_counts)
    assert Profile.for_device("cuda").inductor_for(1) == Profile.for_device("cuda").inductor


def test_empty_buckets_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[buckets]\ndecode_batch_sizes = [0, 2]\nprefill_token_counts = [16]\nchunked_prefill_size = 16\n")
    with pytest.raises(ValueError, match="at least 1"):
        Profile.load(bad)


def test_pick_takes_the_smallest_bucket_that_holds_n():
    assert pick((2, 4, 8), 1) == 2 and pick((2, 4, 8), 4) == 4 and pick((2, 4, 8), 5) == 8
    assert pick((2, 4, 8), 9) is None


@pytest.mark.parametrize("name", ["cpu.toml", "cpu-throughput.toml"])
def test_cpu_profiles_let_inductor_vectorize(name):
    if not valid_vec_isa_list():
        pytest.skip("this CPU has no vector ISA Inductor can use")
    with torch._inductor.config.patch(Profile.load(PROFILES / name).inductor):
        assert pick_vec_isa(), "the profile's Inductor options leave the C++ kernels scalar"


def test_the_cpu_profile_picks_a_vector_isa_without_probing_the_base_isas(monkeypatch):
    """Inductor would build and load a probe (a Python subprocess) for each vector ISA the CPU reports, at
    every start; under the CPU profile's options the CPU's flags decide, and only an extension such as VNNI
    is still probed."""
    from torch._inductor import cpu_vec_isa

    check_build = cpu_vec_isa.VecISA.check_build

    def probe(self, code: str) -> bool:
        assert code != cpu_vec_isa.VecISA._avx_code, f"{self} was probed"
        return check_build(self, code)  # Inductor caches the answer for the process: the true one

    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", probe)
    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    try:
        with torch._inductor.config.patch(Profile.for_device("cpu").inductor):
            cpu_vec_isa.pick_vec_isa()
    finally:
        cpu_vec_isa.valid_vec_isa_list.cache_clear()  # listed under this profile's options: not the process's answer
