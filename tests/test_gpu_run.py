"""experiments/gpu_run.sh, the one GPU command: the cheap part of its CPU rehearsal.

The whole rehearsal (a clean clone, the wheel folder, the exact script on a micro model) is
`bash experiments/rehearse_gpu_run.sh` (about 7 minutes, not part of this suite). Here: the script
parses, every flag it passes exists in the script it passes it to, and a missing input is one line
and exit 2 before anything is installed.
"""

import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "gpu_run.sh"


def _commands() -> dict[str, set[str]]:
    """experiments/NAME.py -> the --flags gpu_run.sh passes to it (arrays expanded, quoted values dropped)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    arrays = {m[1]: m[2] for m in re.finditer(r"^\s*(?:.*&& )?(\w+)=\((.+)\)\s*$", text, re.M)}
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        line = re.sub(r'"\$\{(\w+)\[@\]\}"', lambda m: arrays.get(m[1], ""), line)
        line = re.sub(r'="[^"]*"', "=", line)  # --extra="--keep=1 ...": train flags, checked apart
        for name in re.findall(r'"\$PY" experiments/(\w+)\.py', line):
            out.setdefault(name, set()).update(re.findall(r"(?<![\w-])--(\w+)", line.split(f"{name}.py", 1)[1]))
    return out


def _help(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args, "--help"], capture_output=True, text=True, cwd=REPO,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_gpu_run_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    subprocess.run(["bash", "-n", str(REPO / "experiments" / "rehearse_gpu_run.sh")], check=True)


@pytest.mark.slow
def test_every_flag_gpu_run_passes_exists():
    commands = _commands()
    assert set(commands) == {"bench_gpu", "seed_reproduction", "best_recipe"}, commands
    for name, used in commands.items():
        known = set(re.findall(r"--(\w+)", _help([f"experiments/{name}.py"])))
        assert used and used <= known, (name, used - known)
    extra = re.search(r'--extra="([^"$]*)', SCRIPT.read_text())[1]  # the train flags every study gets
    train_flags = set(re.findall(r"--(\w+)", _help(["-m", "gpt2_jax.train"])))
    assert set(re.findall(r"--(\w+)", extra)) <= train_flags


def test_missing_inputs_are_one_line_and_exit_2(tmp_path):
    repo = tmp_path / "repo"
    (repo / "experiments").mkdir(parents=True)
    (repo / "experiments" / "gpu_run.sh").write_text(SCRIPT.read_text())
    for args in ([], [str(tmp_path / "out")]):  # no OUT_DIR; no .whl/.data beside the script
        proc = subprocess.run(["bash", str(repo / "experiments" / "gpu_run.sh"), *args], capture_output=True,
                              text=True)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "build_gpu_wheels.py" in proc.stderr
