"""Fitting work into memory: free memory per device, rows per call, what counts as out of memory."""

import types

import jax
import jax.numpy as jnp
import pytest

from gpt2_jax import memory


def _linear(fixed: int, per_row: int, compiled_rows: list):
    """A stand-in for compiling a call of n rows that needs fixed + per_row * n bytes."""
    def compile_for(n):
        compiled_rows.append(n)
        stats = types.SimpleNamespace(temp_size_in_bytes=fixed + per_row * n, output_size_in_bytes=0)
        return types.SimpleNamespace(memory_analysis=lambda: stats)
    return compile_for


CPU = [jax.devices("cpu")[0]]


def test_a_call_that_fits_keeps_its_rows_and_is_compiled_once(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda devices: 1000)
    compiled = []
    assert memory.rows_that_fit(_linear(0, 10, compiled), 100, CPU) == 100
    assert compiled == [100]


def test_a_call_too_big_is_shrunk_in_proportion_then_spread_evenly_over_the_calls(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda devices: 333)
    compiled = []
    # 33 rows fit (330 bytes): 100 rows take 4 calls, of 25 rows each rather than 33 + 33 + 33 + 1.
    assert memory.rows_that_fit(_linear(0, 10, compiled), 100, CPU) == 25
    assert compiled == [100, 33]
    compiled = []
    # Per device: a multiple of the 4 devices, 32 rows fit, 4 calls of 28 (112 rows, 12 of them padding).
    assert memory.rows_that_fit(_linear(0, 10, compiled), 100, CPU, multiple=4) == 28
    assert compiled == [100, 32]


def test_fixed_costs_are_taken_into_account_by_checking_again(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda devices: 500)
    compiled = []
    rows = memory.rows_that_fit(_linear(400, 10, compiled), 100, CPU)
    assert compiled == [100, 35, 10]  # 1400 > 500, 35 rows: 750 > 500, 10 rows: 500
    assert rows == 10


def test_when_not_even_the_smallest_call_fits_it_is_an_out_of_memory_error(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda devices: 10)
    with pytest.raises(memory.OutOfMemory, match=r"^1 row needs 20 bytes, more than the 10 bytes that can be used$"):
        memory.rows_that_fit(_linear(0, 20, []), 1, CPU)
    with pytest.raises(memory.OutOfMemory, match=r"^4 rows need 80 bytes, more than the 10 bytes"):
        memory.rows_that_fit(_linear(0, 20, []), 8, CPU, multiple=4)


def test_unknown_free_memory_does_not_limit_or_compile(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda devices: None)
    compiled = []
    assert memory.rows_that_fit(_linear(0, 10, compiled), 10**6, CPU) == 10**6
    assert compiled == []


def test_cpu_devices_share_half_the_free_host_memory_and_accelerators_report_their_pool(monkeypatch):
    monkeypatch.setattr(memory, "_host_free_bytes", lambda: 8 * 2**30)
    cpu = types.SimpleNamespace(platform="cpu")
    assert memory.free_bytes([cpu]) == 4 * 2**30
    assert memory.free_bytes([cpu, cpu]) == 2 * 2**30
    gpu = lambda used: types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 1000,
                                                                                    "bytes_in_use": used})
    assert memory.free_bytes([gpu(400), gpu(100)]) == 540  # 90% of the tighter device's 600
    assert memory.free_bytes([types.SimpleNamespace(platform="gpu", memory_stats=lambda: None)]) is None


def test_bytes_needed_is_what_xla_allocates_for_the_outputs_and_temporaries():
    compiled = jax.jit(lambda x: jnp.outer(x, x) + 1).lower(jnp.ones(1000)).compile()
    assert memory.bytes_needed(compiled) >= 1000 * 1000 * 4


@pytest.mark.parametrize("error,expected", [
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 91955200080 bytes."), True),
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1172552702912 bytes."),
     True),
    (MemoryError("Unable to allocate 40.0 GiB for an array with shape (100000, 100000)"), True),
    (memory.OutOfMemory("1 row needs 20 bytes"), True),
    (jax.errors.JaxRuntimeError("INTERNAL: the compiler crashed"), False),
    (ValueError("Out of memory"), False),
])
def test_out_of_memory_is_a_memory_error_or_an_xla_allocation_failure(error, expected):
    assert memory.is_out_of_memory(error) is expected


def test_sizes_are_written_for_people():
    assert [memory.size(n) for n in (900, 2048, 3 * 2**20, 38231101808)] == [
        "900 bytes", "2.0 KiB", "3.0 MiB", "35.6 GiB"]
