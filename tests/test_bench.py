import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import bench, core
from gpt2_jax.config import GPT2Config

from conftest import REPO


def test_flops_per_token_is_six_n_plus_attention():
    # small: non-embedding 85,056,000 + tied head 32000*768, plus 12 * L * D * T attention.
    expected = 6 * (85_056_000 + 32_000 * 768) + 12 * 12 * 768 * 128
    assert bench.train_flops_per_token(GPT2Config.preset("small")) == expected
    assert abs(expected - 673e6) / 673e6 < 0.01  # the "about 673 MFLOP per token"


def _losses(cfg, steps=40):
    train_cfg = core.TrainConfig(batch_size=8, lr=3e-3, warmup_steps=2)
    opt, sched = core.make_optimizer(train_cfg, steps), core.make_schedule(train_cfg, steps)
    state = core.init_train_state(cfg, opt, jax.random.PRNGKey(0))
    step = jax.jit(core.make_train_step(cfg, opt, sched, axis_name=None))
    # A learnable stream: a few fixed random sequences seen again and again.
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (8, cfg.n_ctx + 1), 0, cfg.vocab_size))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((8, cfg.n_ctx), np.float32)}
    out = []
    for _ in range(steps):
        state, m = step(state, batch, jax.random.PRNGKey(2))
        out.append(float(m["loss"]))
    return np.array(out), state


@pytest.mark.slow
def test_bfloat16_training_tracks_float32_within_noise(micro_cfg):
    f32, state32 = _losses(micro_cfg)
    bf16, state16 = _losses(micro_cfg.replace(dtype="bfloat16"))
    assert f32[-1] < f32[0] - 1.0 and bf16[-1] < bf16[0] - 1.0  # both really learn
    assert np.max(np.abs(f32 - bf16)) < 0.1
    assert 0 < np.max(np.abs(f32 - bf16))  # and bf16 really ran in lower precision
    assert state16.params["wte"]["embedding"].dtype == jnp.float32  # master weights stay fp32


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gpt2_jax.bench", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_train_bench_prints_one_consistent_json_line_last():
    proc = _cli("train", "--size=tiny", "--batch_size=2", "--steps=2", "--warmup=0")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["bench"] == "train" and r["batch_size"] == 2 and r["seq_len"] == 128
    assert r["tokens_per_s"] * r["ms_per_step"] / 1e3 == pytest.approx(2 * 128, rel=0.01)
    assert r["mfu"] is None and r["backend"] == "cpu" and r["host_peak_rss_gib"] > 0
    assert 9.0 < r["final_loss"] < 11.0  # about log(32000) = 10.37 at random init
    # MFU against this machine's matmul peak of the dtype it ran (auto: see cli.auto_dtype), measured in the same run.
    assert r["dtype"] in ("float32", "bfloat16") and r["dtype_why"].startswith(("CPU", "GPU", "TPU"))
    peak = r["roofline"]["matmul_bf16_gflops" if r["dtype"] == "bfloat16" else "matmul_f32_gflops"]
    assert r["mfu_measured_peak"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e9), abs=1e-4)


@pytest.mark.slow
def test_generate_bench_prints_one_consistent_json_line_last():
    proc = _cli("generate", "--size=tiny", "--batch_size=2", "--new_tokens=4", "--repeats=1", "--method=nucleus")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["bench"] == "generate" and r["method"] == "nucleus" and r["new_tokens"] == 4
    assert r["new_tokens_per_s"] * r["ms_per_token"] / 1e3 == pytest.approx(2, rel=0.01)
    assert r["time_to_first_token_ms"] > 0 and r["compile_s"] > 0
    # Each decode step reads all weights once: the fraction of the measured bandwidth that is.
    assert r["weight_bytes"] == 11_384_320 * {"float32": 4, "bfloat16": 2}[r["dtype"]]
    assert r["pct_of_bandwidth"] == pytest.approx(
        100 * r["weight_bytes"] * r["new_tokens_per_s"] / 2 / (r["roofline"]["memory_gbps"] * 1e9), abs=0.1)


@pytest.mark.slow
def test_roofline_measures_matmul_peaks_and_bandwidth_of_this_machine():
    r = bench.roofline(n=256, stream_mib=16)
    assert r["matmul_n"] == 256 and r["stream_mib"] == 16 and r["device"] == "cpu"
    # Any real machine does more than 1 GFLOP/s and reads more than 0.5 GB/s; far below any peak.
    assert r["matmul_f32_gflops"] > 1 and r["matmul_bf16_gflops"] > 1 and r["memory_gbps"] > 0.5
    proc = _cli("roofline")
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["bench"] == "roofline" and set(r) <= set(line)


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [(["fly"], "subcommand"), (["train", "--size=huge"], "--size"),
                                         (["generate", "--prompt_len=500"], "--prompt_len")])
def test_bench_user_errors_exit_2_with_one_line(args, needle):
    proc = _cli(*args)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def _experiment(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_sums_each_op_over_threads_and_calls_of_the_busiest_module_only():
    ps = _experiment("profile_step")
    op = lambda name, dur, module="jit_step": {"ph": "X", "dur": dur, "args": {"hlo_op": name, "hlo_module": module}}
    events = [op("ynn_fusion.3", 300), op("ynn_fusion.3", 100), op("ynn_fusion.12", 200), op("wrapped_convert", 50),
              op("copy.1.2", 10), op("wrapped_convert", 90, "jit_other"),  # another module: less time in all
              {"ph": "X", "dur": 5000, "name": "ThunkExecutor::Execute"}]  # not an op: no hlo_op
    seconds = ps.op_seconds(events, calls=2)
    assert seconds == pytest.approx({"ynn_fusion.3": 200e-6, "ynn_fusion.12": 100e-6, "wrapped_convert": 25e-6,
                                     "copy.1.2": 5e-6})
    hlo = """HloModule jit_step
  %ynn_fusion.3 = f32[256,2000]{1,0} fusion(bf16[256,2048]{1,0} %a, bf16[2048,2000]{1,0} %b), kind=kCustom
  ROOT %while.7 = (s32[], f32[2048]{0}) while((s32[], f32[2048]{0}) %t), condition=%c, body=%b
  copy.1.2 = bf16[8,128]{0,1} copy(bf16[8,128]{1,0} %x)
"""
    shapes = ps.hlo_shapes(hlo)
    assert shapes == {"ynn_fusion.3": "f32[256,2000]", "while.7": "(s32[], f32[2048])", "copy.1.2": "bf16[8,128]"}
    summary = ps.summarize({k: v * 1e3 for k, v in seconds.items()}, shapes, top=2)
    assert summary["ops_s"] == pytest.approx(0.33)
    assert summary["groups_s"] == {"ynn_fusion": 0.3, "wrapped_convert": 0.025, "copy": 0.005}
    assert summary["top_ops"] == [{"op": "ynn_fusion.3", "s": 0.2, "shape": "f32[256,2000]"},
                                  {"op": "ynn_fusion.12", "s": 0.1, "shape": None}]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
def test_every_timed_gemv_form_computes_the_same_row_times_matrix(dtype):
    gl = _experiment("gemv_in_loop_cpu")
    d_in, d_out = 48, 80
    rng = np.random.default_rng(0)
    x_I = rng.integers(-4, 5, d_in).astype(np.float32)  # small integers: exact in every dtype
    w_IO = rng.integers(-100, 101, (d_in, d_out)).astype(np.float32)
    want = x_I.astype(np.float64) @ w_IO
    for form in gl.FORMS:
        w = jnp.asarray(w_IO.T if gl.stores_OI(form) else w_IO).astype(dtype)
        got = jax.jit(lambda x, w: gl.product(form, x, w))(jnp.asarray(x_I), w)
        chex.assert_shape(got, (d_out,))
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=form)
