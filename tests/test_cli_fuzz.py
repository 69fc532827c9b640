"""CLI fuzzing: every flag of every tool refuses a wrong-type, missing, empty or out-of-range value
with exit code 2 and ONE stderr line that names the flag, before any data, model or device work.

The cases come from each tool's own FlagValues: a flag's type gives its wrong-type and
missing-value cases, ``RANGES`` its out-of-range ones, and ``RANGES`` must list every flag a tool
defines, so a flag added later without cases fails ``test_ranges_table_lists_every_flag_of_every_tool``.
Heavy entry points (data preparation, generation, benchmarks, Hugging Face I/O, jax.distributed)
raise ``HeavyWorkReached`` during these tests: a flag refused too late fails loudly, and fast.
"""

import os
import re
import subprocess
import sys

import jax
import pytest
from absl import flags

from gpt2_jax import bench, cli, convert, data, evaluate, hf, pretrained, sample, train
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params
from gpt2_jax.tokenizer import train_tokenizer

from conftest import REPO

TOOLS = {  # tool: (module with main, its flag-definition function)
    "train": (train, train._define_flags),
    "sample": (sample, sample.define_flags),
    "evaluate": (evaluate, evaluate._define_flags),
    "convert": (convert, convert.define_flags),
    "bench": (bench, bench._define_flags),
    "data": (data, data._define_flags),
}

# Valid arguments each case is appended to; {run} is the micro run below, {tmp} a fresh folder.
BASE = {
    "train": ["train", "--run_dir={tmp}/run", "--data_dir={tmp}/data", "--cache_dir={tmp}/cache"],
    "sample": ["sample", "--run_dir={run}", "--prompt=The"],
    "evaluate": ["evaluate", "--run_dir={run}", "--data_dir={tmp}/data"],
    "convert": ["convert", "--run_dir={run}", "--to_hf={tmp}/hf"],
    "bench": ["bench", "generate"],
    "data": ["data", "--data_dir={tmp}/data", "--cache_dir={tmp}/cache"],
}

V, N_CTX = 300, 32  # the micro run's vocabulary and context: the bounds only a loaded model knows
MAX_SEED = 2**32 - 1  # jax.random.PRNGKey keeps 32 bits

# Out-of-range values of every flag: "v" means --flag=v; a tuple is a whole set of arguments (for
# ranges that involve two flags). () says the flag has no range (a path, a choice, a switch); its
# wrong-type, missing and empty values are generated from its type.
RANGES = {
    "train": {
        "size": (), "run_dir": (), "data_dir": (), "cache_dir": (), "init_from": (), "init_step": ("last", "-1"),
        "epochs": ("0", "-1"), "max_steps": ("0",), "batch_size": ("0", "-8"), "eval_batch_size": ("0",),
        "time_budget_minutes": ("0", "-1", ("--time_budget_minutes=30", "--warmup_steps=1")), "recipe": (),
        "lr": ("0", "-0.001"), "warmup_steps": ("-1",), "final_lr_fraction": ("-0.1", "1.5"),
        "schedule": (), "decay_fraction": ("0", "1.5", ("--schedule=cosine", "--decay_fraction=0.5")),
        "weight_decay": ("-0.1",), "grad_clip": ("-1",), "b2": ("1", "-0.5"), "seed": ("-1", str(MAX_SEED + 1)),
        "dropout": ("-0.1", "1"), "dtype": (), "remat": (),
        "vocab_size": ("0", "257"), "n_ctx": ("0",), "n_layer": ("0",), "d_ff": ("0",),
        "d_model": ("0", ("--d_model=30", "--n_head=4")),
        "n_head": ("0", "5"),  # the tiny preset's d_model 256 is not divisible by 5 heads
        "eval_every": ("0",), "ckpt_every": ("0",), "ckpt_minutes": ("-1",), "keep": ("0",), "log_every": ("0",),
        "quiet": (), "verbose": (), "distributed": (), "coordinator_address": ("localhost",), "num_processes": ("0",),
        "process_id": ("-1", ("--num_processes=2", "--process_id=2")), "local_device_ids": ("a", "-1"),
    },
    "sample": {
        "run_dir": (), "hf_dir": (), "step": ("last", "-1"), "method": (),
        "prompt": ("", "\udcff\udcfe"),  # empty after tokenization; bytes 0xff 0xfe as Python decodes them
        "max_new_tokens": ("0", "-5"), "top_k": ("0", ("--method=top_k", f"--top_k={V + 1}")),
        "top_p": ("0", "1.5", "-0.1"),
        "temperature": ("-1",), "num_samples": ("0",), "seed": ("-1", str(MAX_SEED + 1)), "stop_at_eos": (),
        "slide_keep": ("0", str(N_CTX + 1)), "dtype": (), "quantize": (),
    },
    "evaluate": {
        "run_dir": (), "hf_dir": (), "step": ("last", "-1"), "split": (), "data_dir": (),
        "stride": ("0", str(N_CTX + 1), ("--seq_len=8", "--stride=9")), "seq_len": ("0", "1", str(N_CTX + 1)),
        "batch_size": ("0", "-1"), "output": (), "quiet": (), "verbose": (), "dtype": (), "quantize": (),
    },
    "convert": {"from_hf": (), "to_hf": (), "run_dir": (), "step": ("abc", "-1")},
    "bench": {
        "size": (), "dtype": (), "batch_size": ("0",), "steps": ("0",), "warmup": ("-1",), "remat": (),
        "dropout": ("-0.1", "1"), "attention": (), "peak_tflops": ("0", "-1"), "prompt_len": ("0", "129"),
        "new_tokens": ("0",), "method": (), "repeats": ("0",), "seed": ("-1", str(MAX_SEED + 1)), "quantize": (),
    },
    "data": {"data_dir": (), "cache_dir": (), "vocab_size": ("0", "257"), "variant": (), "verbose": ()},
}


def _type_cases(flag: flags.Flag) -> list[tuple[str, ...]]:
    """Wrong-type, missing (the flag last, no value) and empty values, from the flag's type."""
    name = flag.name
    if flag.boolean:
        return [(f"--{name}=maybe",), (f"--{name}=",), (f"--no{name}=1",)]
    cases = [(f"--{name}",)]
    if isinstance(flag.parser, flags.IntegerParser):
        cases += [(f"--{name}=abc",), (f"--{name}=1.5",), (f"--{name}=",)]
    elif isinstance(flag.parser, flags.FloatParser):
        cases += [(f"--{name}=fast",), (f"--{name}=",), (f"--{name}=nan",), (f"--{name}=inf",)]
    elif isinstance(flag.parser, flags.EnumParser):
        cases += [(f"--{name}=bogus",), (f"--{name}=",)]
    elif not isinstance(flag, flags.MultiFlag):  # a string or a list; an empty prompt is in RANGES
        cases += [(f"--{name}=",)]
    return cases


def _cases():
    for tool, (_, define) in TOOLS.items():
        fv = define()
        for name in fv:
            ranged = [v if isinstance(v, tuple) else (f"--{name}={v}",) for v in RANGES[tool].get(name, ())]
            for args in _type_cases(fv[name]) + ranged:
                label = " ".join(args).encode("unicode_escape").decode()
                yield pytest.param(tool, name, args, id=f"{tool} {label}")


class HeavyWorkReached(Exception):
    pass


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Every entry point into slow work raises: a flag must be refused before any of them."""
    def refuse(what):
        def heavy(*args, **kwargs):
            raise HeavyWorkReached(f"{what} was called: the bad flag was not refused before the heavy work")
        return heavy

    for owner, attr in [(data, "prepare_corpus"), (jax.distributed, "initialize"), (sample, "generate"),
                        (sample, "stream_generate"), (bench, "bench_train"), (bench, "bench_generate"),
                        (hf, "load_hf_with_tokenizer"), (hf, "save_hf")]:
        monkeypatch.setattr(owner, attr, refuse(f"{owner.__name__}.{attr}"))


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, wikitext_dir):
    """A run directory with a micro model (vocabulary V, context N_CTX) for the checks that need one."""
    lines = (wikitext_dir / "wiki.train.tokens").read_text(encoding="utf-8").splitlines()[:2000]
    tok = train_tokenizer(lines, vocab_size=V)
    cfg = GPT2Config(vocab_size=V, n_ctx=N_CTX, n_layer=1, d_model=16, n_head=2, d_ff=32)
    params = init_params(cfg, jax.random.PRNGKey(0))
    return pretrained.save_params_as_run(tmp_path_factory.mktemp("fuzz") / "run", cfg, params, tok, step=0)


def _assert_one_line_naming(err: str, name: str) -> None:
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert re.search(rf"--(no)?{re.escape(name)}\b", err), f"the error does not name --{name}: {err}"


def test_ranges_table_lists_every_flag_of_every_tool():
    for tool, (_, define) in TOOLS.items():
        defined = set(define())
        assert set(RANGES[tool]) == defined, (
            f"{tool}: flags without fuzz cases {sorted(defined - set(RANGES[tool]))}, "
            f"stale entries {sorted(set(RANGES[tool]) - defined)}")


@pytest.mark.parametrize("tool,name,args", list(_cases()))
def test_bad_flag_value_exits_2_with_one_line_naming_the_flag(tool, name, args, micro_run, tmp_path,
                                                              no_heavy_work, capsys):
    module, _ = TOOLS[tool]
    argv = [a.format(run=micro_run, tmp=tmp_path) for a in BASE[tool]] + list(args)
    with pytest.raises(SystemExit) as exit_:
        cli.run(module.main, argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, (out, err)
    _assert_one_line_naming(err, name)
    assert out == ""  # nothing was generated or reported


@pytest.mark.parametrize("tool,args,values", [
    ("sample", ["--top_p=1", "--temperature=0", f"--seed={MAX_SEED}", "--slide_keep=1", "--max_new_tokens=1"],
     {"top_p": 1.0, "temperature": 0.0, "seed": MAX_SEED, "slide_keep": 1, "max_new_tokens": 1}),
    ("evaluate", ["--seq_len=2", "--stride=2", "--batch_size=1"], {"seq_len": 2, "stride": 2, "batch_size": 1}),
    ("bench", ["--dropout=0", "--warmup=0", "--peak_tflops=0.5", f"--seed={MAX_SEED}"],
     {"dropout": 0.0, "warmup": 0, "peak_tflops": 0.5, "seed": MAX_SEED}),
    ("data", ["--vocab_size=258"], {"vocab_size": 258}),
    ("convert", ["--step=0"], {"step": "0"}),
])
def test_values_on_the_edge_of_each_range_are_accepted(tool, args, values):
    fv = cli.parse_flags(TOOLS[tool][1](), [tool, *args])
    assert {k: fv[k].value for k in values} == values


def test_an_unknown_flag_is_named_with_the_closest_real_one():
    with pytest.raises(cli.UserError, match=r"^unknown flag --top-p; did you mean --top_p or --top_k\? \(see --h"):
        cli.parse_flags(sample.define_flags(), ["sample", "--top-p=0.5"])
    with pytest.raises(cli.UserError, match=r"^unknown flag --stop_eos; did you mean --stop_at_eos or --nostop_at_eos"):
        cli.parse_flags(sample.define_flags(), ["sample", "--stop_eos"])


def test_a_newline_in_a_value_still_gives_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run(sample.main, ["sample", "--prompt=x", "--method=top\nk"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--method=top\\nk" in err, err


def _python_m(tool, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", f"gpt2_jax.{tool}", *args], capture_output=True, env=env,
                          cwd=REPO, timeout=300)


def _assert_exit_2_one_line(proc, name):
    err = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == 2, err
    _assert_one_line_naming(err, name)
    assert proc.stdout == b""


@pytest.mark.slow
def test_non_utf8_prompt_bytes_are_refused_in_one_line_not_sampled(micro_run):
    proc = _python_m("sample", f"--run_dir={micro_run}", b"--prompt=\xff\xfe", "--max_new_tokens=2")
    _assert_exit_2_one_line(proc, "prompt")
    assert proc.stderr == b"error: --prompt is not valid UTF-8 (byte 0xff at character 0); give the text in UTF-8\n"
    two = _python_m("sample", f"--run_dir={micro_run}", "--prompt=fine", b"--prompt=caf\xe9")
    assert two.stderr == (b"error: --prompt is not valid UTF-8 (byte 0xe9 at character 3 of prompt 2); "
                          b"give the text in UTF-8\n")


@pytest.mark.slow
@pytest.mark.parametrize("tool,args,name", [
    ("train", ["--run_dir={tmp}/run", "--noquiet=1"], "quiet"),
    ("evaluate", ["--run_dir={tmp}/run", "--seq_len=8", "--stride=9"], "stride"),
    ("convert", ["--run_dir={tmp}/run", "--to_hf={tmp}/hf", "--step=-1"], "step"),
    ("bench", ["generate", f"--seed={MAX_SEED + 1}"], "seed"),
    ("data", ["--cache_dir={tmp}/cache", "--vocab_size=100"], "vocab_size"),
], ids=["train", "evaluate", "convert", "bench", "data"])
def test_python_dash_m_exits_2_with_one_line_naming_the_flag(tool, args, name, tmp_path):
    proc = _python_m(tool, *[a.format(tmp=tmp_path) for a in args])
    _assert_exit_2_one_line(proc, name)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
