"""The command-line shell shared by every ``python -m gpt2_jax.<tool>``.

Flags are absl-style, but each tool defines them on its OWN ``FlagValues`` (never absl's global
``FLAGS``), so importing tools or their pure functions registers nothing global. Ranges are declared
with the flag, so a bad value is refused while parsing, before any data or model is loaded. A
user's mistake raises ``UserError``; ``run`` prints it as one line on stderr and exits with status 2.
"""

from __future__ import annotations

import difflib
import math
import os
import pathlib
import platform
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
from absl import flags

from gpt2_jax import decode, memory
from gpt2_jax.errors import UserError


def check(flag_values: flags.FlagValues, name: str, ok: Callable[[Any], bool], requirement: str) -> None:
    """Refuse ``--name`` at parse time unless ``ok(value)`` (None, an unset default, passes); the
    error reads ``flag --name=VALUE: <requirement>``, e.g. ``requirement="must be in (0, 1]"``."""
    flags.register_validator(name, lambda v: v is None or ok(v), message=requirement, flag_values=flag_values)


def folder_flag(path: str | os.PathLike, flag: str, what: str, fix: str, *,
                may_be_new: bool = False) -> pathlib.Path:
    """``path``, given as ``--flag``, if it is a folder (or absent and ``may_be_new``); else a UserError
    saying it is not ``what`` ("a run directory"), ended by ``fix``."""
    path = pathlib.Path(path)
    if path.is_dir() or (may_be_new and not os.path.lexists(path)):
        return path
    if os.path.lexists(path):
        kind = "a file" if path.is_file() else "a broken link" if not path.exists() else "a special file"
        raise UserError(f"--{flag}={path} is {kind}, not {what}; {fix}")
    raise UserError(f"--{flag}={path} does not exist; {fix}")


# --dtype=auto: bf16 matmuls (float32 accumulation) where the hardware has native bf16 dots.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def define_dtype_flag(flag_values: flags.FlagValues, default: str = "auto") -> None:
    """``--dtype`` (auto, float32, bfloat16); ``resolve_dtype(value, workload)`` settles auto."""
    flags.DEFINE_enum("dtype", default, ["auto", "float32", "bfloat16"], "compute dtype; parameters stay "
                      "float32 and softmax, LayerNorm and the loss run in float32. auto: bfloat16 on GPU/TPU; on "
                      "CPU bfloat16 for training and evaluation with AVX512-BF16 or AMX, for decoding only with "
                      "AMX; float32 elsewhere", flag_values=flag_values)


def define_quantize_flag(flag_values: flags.FlagValues) -> None:
    """``--quantize`` (``decode.QUANTIZE``): int8 inference (``model.quantize_int8``, ``decode.inference_config``)."""
    flags.DEFINE_enum("quantize", "none", list(decode.QUANTIZE), "int8: weight-only int8 inference, "
                      "a quarter of the weight bytes (Dense kernels per output column, the token embedding per "
                      "token; scales in float32); int8_dynamic: the same weights, and each product's input rows "
                      "quantized to int8 on the fly (int8 x int8 products, faster on CPU)", flag_values=flag_values)


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags the kernel reports for this CPU (empty where there is no cpuinfo)."""
    try:
        text = pathlib.Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "flags:")
    return frozenset(line.partition(":")[2].split())


def auto_dtype(workload: str, *, platform: str, compute_capability: str | None = None,
               cpu_flags: frozenset[str] = frozenset()) -> tuple[str, str]:
    """(dtype, why) that ``--dtype=auto`` means for ``workload`` ("batched": training and evaluation,
    "decode": a few rows per step) on a ``platform`` ("cpu", "gpu", "tpu") device.

    On CPU, decoding's products have a handful of rows and are bound by reading the weights, which bf16
    halves, but XLA:CPU reads bf16 weights that fast only through AMX. Greedy new tokens/s, bf16 against
    float32: 2-core Xeon with AMX, small at batch 1, 73 against 50 (``bench generate``, commit 3385d3a);
    2-core EPYC (Zen 4) with AVX512-BF16 and no AMX, ``experiments/bench_cpu_vs_pytorch.py``: small 51
    against 55 (batch 8: 281 against 319), tiny 319 against 477 (batch 8: 1,664 against 1,815), while its
    training runs 1.8-2.1x faster in bf16; 2-core EPYC (Zen 5), the same script at 3aad617 (run 4): small 74
    against 94 (batch 8: 475 against 397), tiny 784 against 929 (batch 8: 2,678 against 2,502), training
    1.7-1.9x faster in bf16. XLA:CPU's bf16 matrix-vector products read about 20 GB/s there, float32's at
    the bandwidth (``experiments/gemv_in_loop_cpu.py``).
    """
    assert workload in ("batched", "decode"), workload
    if platform == "tpu":
        return "bfloat16", "TPU"
    if platform == "gpu":
        cc = tuple(int(p) for p in (compute_capability or "8.0").split(".")[:2])
        if cc >= (8, 0):
            return "bfloat16", f"GPU of compute capability {compute_capability or 'unknown'}"
        return "float32", f"GPU of compute capability {compute_capability}: no bf16 tensor cores"
    if workload == "decode":
        if "amx_bf16" in cpu_flags:
            return "bfloat16", "CPU decoding with amx_bf16"
        return "float32", "CPU decoding without AMX: XLA:CPU reads bf16 weights no faster than float32 there"
    native = sorted(cpu_flags & BF16_CPU_FLAGS)
    if native:
        return "bfloat16", f"CPU with {' and '.join(native)}"
    return "float32", "CPU without AVX512-BF16 or AMX"


def resolve_dtype(requested: str, workload: str) -> tuple[str, str]:
    """``(dtype, why)``: ``requested`` itself, or what auto means for ``workload`` on this process's first
    device (``auto_dtype``)."""
    if requested != "auto":
        return requested, "--dtype"
    device = jax.local_devices()[0]
    return auto_dtype(workload, platform=device.platform, cpu_flags=cpu_flags(),
                      compute_capability=getattr(device, "compute_capability", None))


def _one_line(text: str) -> str:
    # A flag value may hold a newline; the error must stay one line.
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _unknown_flag(e: flags.UnrecognizedFlagError, flag_values: flags.FlagValues) -> str:
    names = [n for n in flag_values] + [f"no{n}" for n in flag_values if flag_values[n].boolean]
    close = difflib.get_close_matches(e.flagname, names, n=2)
    hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
    return f"unknown flag --{e.flagname}{hint} (see --help)"


def _check_given_values(flag_values: flags.FlagValues) -> None:
    # NaN slips through every range check; "--run_dir=$DIR" with DIR unset would silently mean the default.
    for name in flag_values:
        flag = flag_values[name]
        if not flag.present:
            continue
        if isinstance(flag.value, float) and not math.isfinite(flag.value):
            raise UserError(f"flag --{name}={flag.value}: must be a finite number (see --help)")
        if flag.value == "" or flag.value == []:  # a plain string or a list, given as --name=
            raise UserError(f"flag --{name}= is empty; give a value or leave the flag out (see --help)")


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str], description: str = "") -> flags.FlagValues:
    """Parse ``argv`` (program name first) into ``flag_values``; ``--help`` prints help and exits 0,
    and any mistake (unknown flag, malformed or out-of-range value) is a ``UserError`` naming the flag."""
    args = list(argv)
    if any(a in ("--help", "-h", "--helpfull", "-?") for a in args[1:]):
        prog = args[0] if args else "gpt2_jax"
        print(f"usage: {prog} [--flag=value ...]\n")
        if description:
            print(description.strip() + "\n")
        print(flag_values.get_help(include_special_flags=False))
        sys.exit(0)
    try:
        rest = flag_values(args)
    except flags.UnrecognizedFlagError as e:
        raise UserError(_unknown_flag(e, flag_values)) from None
    except (flags.Error, ValueError) as e:  # absl raises a bare ValueError for "--noquiet=1"
        raise UserError(f"{_one_line(str(e))} (see --help)") from None
    _check_given_values(flag_values)
    if len(rest) > 1:
        raise UserError(f"unexpected positional arguments {rest[1:]}; flags are written --name=value (see --help)")
    return flag_values


def run(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None, *,
        out_of_memory: str = "free memory or use a machine with more") -> None:
    """Run a CLI ``main(argv)``; ``UserError`` becomes ``error: ...`` on stderr and exit code 2.

    Running out of memory is a setting too big, not a bug: one line ending in ``out_of_memory``,
    the tool's advice (e.g. "lower --batch_size"), exit 2.
    """
    argv = sys.argv if argv is None else argv
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        _exit(2)
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled; the rest re-raised
        if not memory.is_out_of_memory(e):
            raise
        print(f"error: {_one_line(memory.report(e, out_of_memory))}", file=sys.stderr)
        _exit(2)
    sys.exit(code or 0)


HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_environment(environ: dict[str, str], *, libc: tuple[str, str], thp_mode: str) -> dict[str, str] | None:
    """``environ`` plus ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, or None where that changes nothing.

    XLA:CPU takes each step's large temporaries from glibc, which maps them fresh and unmaps them on
    free, so every step faults their pages in again, 4 KiB at a time: small's bf16 training step
    (batch 8) faulted 427k pages and spent 1.08 s of CPU in the kernel per 2.2 s step on the 2-core
    Xeon. With the tunable glibc asks for transparent huge pages (2 MiB) for those mappings: 1.5k
    faults, 0.54 s, the step 1.86 s. None where the kernel's THP mode (``thp_mode``, the contents of
    ``THP_MODE``) is ``never`` (no huge pages) or ``always`` (already huge), the C library is not
    glibc >= 2.35 (no such tunable), the tunable is already set, or ``GPT2_JAX_HUGE_PAGES=0``.
    """
    name, version = libc
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get("GPT2_JAX_HUGE_PAGES") == "0" or "[madvise]" not in thp_mode or name != "glibc"
            or tuple(int(v) for v in version.split(".")[:2]) < (2, 35) or "glibc.malloc.hugetlb" in tunables):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}


def rerun_with_huge_pages() -> None:
    """Replace this process by the same command under ``huge_pages_environment`` (a no-op where it is None).

    glibc reads its tunables once, at start-up, so the command is executed again (same PID, same
    arguments): the training, evaluation and bench tools call this first, before any work.
    """
    try:
        with open(THP_MODE) as f:
            thp_mode = f.read()
    except OSError:
        return
    env = huge_pages_environment(dict(os.environ), libc=platform.libc_ver(), thp_mode=thp_mode)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _exit(code: int, grace_s: float = 5.0) -> None:
    """Exit with ``code`` even if a background thread cannot finish.

    After a failed write (full or read-only disk) Orbax's save threads may wait forever, and Python
    waits for them: they get ``grace_s`` seconds, then the process ends without them.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    deadline = time.monotonic() + grace_s
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for t in stuck:
        threading.Thread.join(t, max(0.0, deadline - time.monotonic()))  # the base join: some subclasses raise
    if any(t.is_alive() for t in stuck):
        os._exit(code)
    sys.exit(code)
