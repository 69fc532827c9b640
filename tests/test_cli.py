"""The CLI shell: out of memory is one line with the tool's advice; a folder flag naming a file says so."""

import os
import re

import jax
import pytest

from gpt2_jax import bench, cli, convert, evaluate, sample, train

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
