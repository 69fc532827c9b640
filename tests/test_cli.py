"""The CLI shell: out of memory is one line with the tool's advice; a folder flag naming a file says so."""

import os
import platform
import re
import subprocess
import sys

import jax
import pytest

from gpt2_jax import bench, cli, convert, evaluate, rundir, sample, train

TOOLS = {  # tool: (module, its flag-definition function)
    "train": (train, train._define_flags),
    "evaluate": (evaluate, evaluate._define_flags),
    "sample": (sample, sample.define_flags),
    "bench": (bench, bench._define_flags),
}
OOM = "RESOURCE_EXHAUSTED: Out of memory allocating 1172552702912 bytes."


def _raising(error):
    def main(argv):
        raise error
    return main


@pytest.mark.parametrize("tool", list(TOOLS))
def test_out_of_device_memory_is_one_line_with_the_tools_advice_naming_its_own_flags(tool, capsys):
    module, define = TOOLS[tool]
    with pytest.raises(SystemExit) as e:
        cli.run(_raising(jax.errors.JaxRuntimeError(OOM)), [tool], out_of_memory=module.OUT_OF_MEMORY)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: out of memory ({OOM}); {module.OUT_OF_MEMORY}\n"
    named = re.findall(r"--(\w+)", module.OUT_OF_MEMORY)
    assert named and set(named) <= set(define()), named  # the advice names real flags of that tool


def test_the_advice_says_which_settings_to_lower():
    assert train.OUT_OF_MEMORY == "lower --batch_size (or --eval_batch_size) or pass --remat"
    assert evaluate.OUT_OF_MEMORY == "lower --batch_size or --seq_len"
    assert sample.OUT_OF_MEMORY == "lower --max_new_tokens or --num_samples"
    assert "--batch_size" in bench.OUT_OF_MEMORY


def test_out_of_host_memory_is_the_same_one_line(capsys):
    error = MemoryError("Unable to allocate 37.3 GiB for an array with shape (100000, 100000) and data type float32")
    with pytest.raises(SystemExit) as e:
        cli.run(_raising(error), ["x"], out_of_memory="lower --rows")
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: out of memory ({error}); lower --rows\n"


def test_a_multi_line_xla_message_is_cut_to_its_first_line(capsys):
    with pytest.raises(SystemExit):
        cli.run(_raising(jax.errors.JaxRuntimeError(OOM + "\nBuffer 1:\n\tSize: 1.07TiB")), ["x"], out_of_memory="a")
    assert capsys.readouterr().err == f"error: out of memory ({OOM}); a\n"


def test_other_runtime_errors_keep_their_traceback():
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: the compiler crashed"):
        cli.run(_raising(jax.errors.JaxRuntimeError("INTERNAL: the compiler crashed")), ["x"])
    with pytest.raises(ValueError):
        cli.run(_raising(ValueError("Out of memory")), ["x"])


def test_a_folder_flag_says_what_the_path_is_instead(tmp_path):
    (tmp_path / "f").write_text("x")
    os.symlink(tmp_path / "gone", tmp_path / "link")
    check = lambda name, **kw: cli.folder_flag(tmp_path / name, "run_dir", "a run directory", "fix it", **kw)
    assert check(".") == tmp_path / "."
    assert check("new", may_be_new=True) == tmp_path / "new"
    for name, says in (("f", "is a file, not a run directory"), ("link", "is a broken link, not a run directory"),
                       ("new", "does not exist")):
        with pytest.raises(cli.UserError) as e:
            check(name)
        assert str(e.value) == f"--run_dir={tmp_path / name} {says}; fix it"
    with pytest.raises(cli.UserError, match="is a file"):
        check("f", may_be_new=True)


@pytest.mark.parametrize("tool,args,says", [
    ("train", ["--run_dir={file}"], "--run_dir={file} is a file, not a directory; choose another --run_dir"),
    ("convert", ["--run_dir={file}", "--to_hf={tmp}/out"],
     "--run_dir={file} is a file, not a run directory; pass the --run_dir of a training run"),
    ("convert", ["--run_dir={file}", "--from_hf={tmp}"], "--run_dir={file} is a file, not a run directory; "
                                                         "choose a new --run_dir"),
    ("convert", ["--run_dir={tmp}/run", "--from_hf={file}"], "--from_hf={file} is a file, not a Hugging Face GPT-2 "
                                                             "folder; pass the folder holding config.json"),
    ("convert", ["--run_dir={tmp}/run", "--to_hf={file}"], "--to_hf={file} is a file, not a folder; choose a new "
                                                           "folder to export into"),
], ids=["train", "convert-export", "convert-import", "convert-from-hf", "convert-to-hf"])
def test_a_folder_flag_naming_a_file_is_one_line_and_the_file_is_untouched(tool, args, says, tmp_path, capsys):
    module = {"train": train, "convert": convert}[tool]
    file = tmp_path / "notes.txt"
    file.write_text("not a folder\n")
    names = dict(file=file, tmp=tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.run(module.main, [tool, *[a.format(**names) for a in args]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says.format(**names)}") and err.count("\n") == 1, err
    assert file.read_text() == "not a folder\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------------- --dtype=auto

AVX512_BF16 = {"avx512f", "avx512_bf16"}
AMX = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize("workload, platform, cc, flags_, expected", [
    ("batched", "tpu", None, set(), "bfloat16"),
    ("batched", "gpu", "9.0", set(), "bfloat16"),
    ("batched", "gpu", "8.6", set(), "bfloat16"),
    ("batched", "gpu", "7.0", set(), "float32"),  # V100: no bf16 tensor cores
    ("batched", "cpu", None, AVX512_BF16, "bfloat16"),
    ("batched", "cpu", None, AMX, "bfloat16"),
    ("batched", "cpu", None, {"avx2", "avx512f", "avx512_vnni"}, "float32"),
    ("batched", "cpu", None, set(), "float32"),
    ("decode", "tpu", None, set(), "bfloat16"),
    ("decode", "gpu", "9.0", set(), "bfloat16"),
    ("decode", "gpu", "7.0", set(), "float32"),
    ("decode", "cpu", None, AVX512_BF16, "float32"),  # Zen 4: bf16 weights read no faster than float32
    ("decode", "cpu", None, AMX, "bfloat16"),
    ("decode", "cpu", None, set(), "float32"),
])
def test_auto_dtype_is_bf16_only_where_the_hardware_runs_that_workload_faster_in_it(workload, platform, cc,
                                                                                     flags_, expected):
    dtype, why = cli.auto_dtype(workload, platform=platform, compute_capability=cc, cpu_flags=frozenset(flags_))
    assert dtype == expected
    assert why and "\n" not in why


def test_auto_dtype_rejects_an_unknown_workload():
    with pytest.raises(AssertionError):
        cli.auto_dtype("serving", platform="cpu")


def test_cpu_flags_are_read_from_cpuinfo_and_empty_without_one(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: spectre\n")
    assert cli.cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cli.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("workload", ["batched", "decode"])
def test_resolve_dtype_keeps_a_given_dtype_and_settles_auto_by_this_device(workload):
    assert cli.resolve_dtype("float32", workload) == ("float32", "--dtype")
    assert cli.resolve_dtype("bfloat16", workload) == ("bfloat16", "--dtype")
    device = jax.local_devices()[0]
    expected = cli.auto_dtype(workload, platform=device.platform, cpu_flags=cli.cpu_flags(),
                              compute_capability=getattr(device, "compute_capability", None))
    assert cli.resolve_dtype("auto", workload) == expected


def test_training_with_auto_resumes_in_the_dtype_the_run_recorded(tmp_path):
    rundir.write_run_json(tmp_path, {"model": {"dtype": "bfloat16"}})
    assert train.training_dtype("auto", tmp_path)[0] == "bfloat16"
    rundir.write_run_json(tmp_path, {"model": {"dtype": "float32"}})
    assert train.training_dtype("auto", tmp_path)[0] == "float32"
    assert train.training_dtype("bfloat16", tmp_path)[0] == "bfloat16"  # given: the config check decides
    dtype, why = cli.resolve_dtype("auto", "batched")
    assert train.training_dtype("auto", tmp_path / "new") == (dtype, f"auto: {why}")


MADVISE = "always [madvise] never\n"


@pytest.mark.parametrize("environ, libc, thp_mode, tunables", [
    ({}, ("glibc", "2.36"), MADVISE, cli.HUGE_PAGES),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, ("glibc", "2.35"), MADVISE,
     "glibc.malloc.arena_max=2:" + cli.HUGE_PAGES),  # the user's own tunables are kept
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, ("glibc", "2.36"), MADVISE, None),  # the user's choice
    ({"GPT2_JAX_HUGE_PAGES": "0"}, ("glibc", "2.36"), MADVISE, None),  # opted out
    ({}, ("glibc", "2.34"), MADVISE, None),  # no such tunable yet
    ({}, ("", ""), MADVISE, None),  # musl and others
    ({}, ("glibc", "2.36"), "always madvise [never]\n", None),  # no huge pages to ask for
    ({}, ("glibc", "2.36"), "[always] madvise never\n", None),  # every mapping is huge already
])
def test_huge_pages_environment_adds_the_tunable_only_where_it_changes_something(environ, libc, thp_mode, tunables):
    env = cli.huge_pages_environment({"PATH": "/bin", **environ}, libc=libc, thp_mode=thp_mode)
    if tunables is None:
        assert env is None
    else:
        assert env == {"PATH": "/bin", **environ, "GLIBC_TUNABLES": tunables}


def test_rerun_with_huge_pages_runs_the_same_command_again_with_the_tunable(tmp_path):
    try:
        thp_mode = open(cli.THP_MODE).read()
    except OSError:
        thp_mode = ""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GPT2_JAX_HUGE_PAGES")}
    code = ("import os, sys; from gpt2_jax import cli; print('before', os.getpid(), flush=True); "
            "cli.rerun_with_huge_pages(); print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    out = subprocess.run([sys.executable, "-c", code, "--x=1"], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    expected = cli.huge_pages_environment(env, libc=platform.libc_ver(), thp_mode=thp_mode)
    pid = out[0].split()[1]
    if expected is None:  # this machine: nothing to change, so no second run
        assert out[:2] == [f"before {pid}", f"after {pid} None ['--x=1']"]
    else:  # the same process (PID) ran the command again, from the start, with the tunable
        assert out[:3] == [f"before {pid}", f"before {pid}", f"after {pid} {cli.HUGE_PAGES} ['--x=1']"]
