"""Build the wheel folder and the WikiText-2 copy that the offline GPU run (experiments/gpu_run.sh) installs from.

    python experiments/build_gpu_wheels.py                       # .whl/ for the GPU image's Python 3.12.3, .data/wikitext-2/
    python experiments/build_gpu_wheels.py --python_version=3.11 --dest=/tmp/whl   # for the CPU rehearsal here

The GPU machine has no network, and its image already holds jax, flax, optax, orbax, chex, tokenizers, ...
(the names in experiments/gpu_image_packages.txt). This resolves the project's runtime dependencies
(pyproject.toml) for Linux x86-64 and the given Python, keeps the packages the image lacks, and downloads
their wheels, binary only (`promise`, published only as a source archive, is built here into a pure-Python
wheel). It writes
  DEST/*.whl
  DEST/requirements.txt    the packages the image lacks, pinned: what gpu_run.sh installs with --no-index
  DEST/image-provided.txt  the rest of the resolution, pinned: what the image is taken to hold (the CPU
                           rehearsal installs these from PyPI to stand in for the image)
  DEST/fallbacks.txt       small wheels of image packages that the new ones put a floor on (protobuf...),
                           carried so that pip can upgrade an image release that falls short; unused otherwise
copies wiki.{train,valid,test}.tokens into --data_dest, and prints every file's size and the totals.
Both folders are git-ignored; carry them to the GPU machine beside the working tree.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # pip always has it
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[1]
SPLIT_FILES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")
# Published only as source archives; pure Python, so a wheel built here installs anywhere.
SDIST_ONLY = ("promise",)
# What the device tool carries beside the working tree, in all.
CARRY_LIMIT_MIB = 64
FALLBACK_MAX_BYTES = 2**20


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def target_environment(python_version: str) -> dict[str, str]:
    """The marker environment of CPython ``python_version`` on Linux x86-64."""
    return {**default_environment(), "python_version": ".".join(python_version.split(".")[:2]),
            "python_full_version": python_version, "sys_platform": "linux", "platform_system": "Linux",
            "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
            "platform_python_implementation": "CPython"}


def needed(deps: list[str], items: dict[str, dict], image: set[str], python_version: str) -> set[str]:
    """The resolved packages the image lacks that the project needs on the target.

    Walks the requirements from the project's, with the target's markers; an image package ends a
    path (it came installed with its own dependencies), except for the extras asked of it.
    """
    env = target_environment(python_version)

    def applies(req: Requirement, extras: set[str]) -> bool:
        return req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""})

    found: set[str] = set()
    walked: set[tuple[str, frozenset]] = set()
    todo = [(Requirement(d), set()) for d in deps]
    while todo:
        req, parent_extras = todo.pop()
        if not applies(req, parent_extras):
            continue
        name = normalize(req.name)
        if (name, frozenset(req.extras)) in walked:
            continue
        walked.add((name, frozenset(req.extras)))
        if name not in items:
            sys.exit(f"{req} is needed on Python {python_version} but pip did not resolve it (it evaluated the "
                     f"markers for this Python): run this builder with Python {python_version}")
        reqs = [Requirement(r) for r in items[name].get("requires_dist") or []]
        if name in image:  # installed there, with its own dependencies; not those of the extras we ask for
            reqs = [r for r in reqs if r.marker is not None and applies(r, set(req.extras)) and not applies(r, set())]
        else:
            found.add(name)
        todo += [(r, set(req.extras)) for r in reqs]
    return found


def platforms(glibc: str) -> list[str]:
    """manylinux tags from the given glibc down to 2.5 (legacy aliases included), x86-64."""
    top = int(glibc.split(".")[1])
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(top, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def pip(args: list[str], what: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or proc.stderr.splitlines()
        sys.exit(f"pip could not {what}: {' / '.join(errors[-3:])}")
    return proc.stdout


def fail(message: str) -> None:
    """A user's mistake: one line, exit 2."""
    print(message, file=sys.stderr)
    sys.exit(2)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python_version", default="3.12.3", help="the target's Python (the GPU image: 3.12.3)")
    p.add_argument("--glibc", default="2.28", help="the newest manylinux glibc the target accepts")
    p.add_argument("--dest", default=str(REPO / ".whl"), help="the wheel folder (its *.whl are replaced)")
    p.add_argument("--image_packages", default=str(REPO / "experiments" / "gpu_image_packages.txt"),
                   help="names the target's image already holds, one a line")
    p.add_argument("--data_dir", default=os.environ.get("GPT2_JAX_DATA_DIR") or str(REPO.parent / "shared" / "data" / "wikitext-2"),
                   help="folder with wiki.{train,valid,test}.tokens (default $GPT2_JAX_DATA_DIR)")
    p.add_argument("--data_dest", default=str(REPO / ".data" / "wikitext-2"), help="where the data is copied")
    args = p.parse_args()

    if not re.fullmatch(r"3\.\d+(\.\d+)?", args.python_version):
        fail(f"--python_version must look like 3.12 or 3.12.3, got {args.python_version!r}")
    if not re.fullmatch(r"2\.\d+", args.glibc) or int(args.glibc.split(".")[1]) < 5:
        fail(f"--glibc must look like 2.28 (at least 2.5), got {args.glibc!r}")
    data_dir = pathlib.Path(args.data_dir)
    missing = [f for f in SPLIT_FILES if not (data_dir / f).is_file()]
    if missing:
        fail(f"--data_dir={data_dir} lacks {', '.join(missing)}: pass the folder holding WikiText-2's "
                       f"{', '.join(SPLIT_FILES)}")
    image_file = pathlib.Path(args.image_packages)
    if not image_file.is_file():
        fail(f"--image_packages={image_file} does not exist")
    image = {normalize(line.strip()) for line in image_file.read_text().splitlines()
             if line.strip() and not line.startswith("#")}

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    target = ["--only-binary=:all:", "--python-version", args.python_version, "--implementation", "cp"]
    for tag in platforms(args.glibc):
        target += ["--platform", tag]
    dest = pathlib.Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for old in [*dest.glob("*.whl"), *(dest / f for f in ("requirements.txt", "image-provided.txt", "fallbacks.txt"))]:
        old.unlink(missing_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        built = pathlib.Path(tmp) / "built"
        pip(["wheel", "--quiet", "--no-deps", "-w", str(built), *SDIST_ONLY], f"build wheels of {SDIST_ONLY}")
        report = pathlib.Path(tmp) / "report.json"
        pip(["install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report), "--target",
             str(pathlib.Path(tmp) / "target"), "--find-links", str(built), *target, *deps],
            f"resolve {' '.join(deps)} for Python {args.python_version}")
        items = {normalize(i["metadata"]["name"]): i["metadata"] for i in json.loads(report.read_text())["install"]}
        lacking = sorted(needed(deps, items, image, args.python_version))
        provided = sorted(f"{n}=={m['version']}" for n, m in items.items() if n in image)
        lacking = [f"{n}=={items[n]['version']}" for n in lacking]
        (dest / "requirements.txt").write_text("\n".join(lacking) + "\n")
        (dest / "image-provided.txt").write_text("\n".join(provided) + "\n")
        pip(["download", "--quiet", "--no-deps", "--find-links", str(built), "-d", str(dest), *target, *lacking],
            "download the wheels")

        # What the project's new packages ask of the image's: pip checks it there. Where a small wheel can
        # stand in for an image release that is too old (protobuf, most likely), it is carried as a fallback
        # that pip takes only then; large ones (numpy) are named, not carried.
        asks = [r for line in lacking for r in map(Requirement, items[line.split("==")[0]].get("requires_dist") or [])
                if normalize(r.name) in image and r.specifier and (r.marker is None or r.marker.evaluate({**target_environment(args.python_version), "extra": ""}))]
        asked = sorted({normalize(r.name) for r in asks})
        pip(["download", "--quiet", "--no-deps", "-d", str(pathlib.Path(tmp) / "fallbacks"), *target,
             *(f"{n}=={items[n]['version']}" for n in asked)], "download the fallback wheels")
        fallbacks = []
        for w in sorted((pathlib.Path(tmp) / "fallbacks").glob("*.whl")):
            if w.stat().st_size <= FALLBACK_MAX_BYTES:
                shutil.copyfile(w, dest / w.name)
                fallbacks.append(w.name)
        (dest / "fallbacks.txt").write_text("\n".join(fallbacks) + "\n")

    wheels = sorted(dest.glob("*.whl"))
    names = {normalize(w.name.split("-")[0]) for w in wheels if w.name not in fallbacks}
    assert names == {normalize(r.split("==")[0]) for r in lacking}, (names, lacking)
    data_dest = pathlib.Path(args.data_dest)
    data_dest.mkdir(parents=True, exist_ok=True)
    for f in SPLIT_FILES + ("SHA256SUMS",):
        if (data_dir / f).is_file():
            shutil.copyfile(data_dir / f, data_dest / f)
    data_files = sorted(data_dest.iterdir())

    print(f"Resolved {len(items)} runtime packages for Python {args.python_version}, manylinux x86-64 "
          f"(glibc <= {args.glibc}); the image holds {len(provided)}; {len(items) - len(provided) - len(lacking)} "
          f"more are needed only by newer releases of those; the project needs these {len(lacking)}:")
    for w in wheels:
        if w.name not in fallbacks:
            print(f"  {mib(w.stat().st_size):>9}  {w.name}")
    whl_bytes = sum(w.stat().st_size for w in wheels)
    data_bytes = sum(f.stat().st_size for f in data_files)
    print(f"what they ask of the image's packages (pip checks it there): "
          f"{', '.join(sorted({f'{r.name}{r.specifier}' for r in asks}))}")
    print(f"fallbacks, installed there only if the image's release falls short: {', '.join(fallbacks) or 'none'}")
    print(f"wheels: {mib(whl_bytes)} in {dest} (requirements.txt, image-provided.txt beside them)")
    print(f"data:   {mib(data_bytes)} in {data_dest} ({', '.join(f.name for f in data_files)})")
    tree = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True)
    tree_bytes = sum((REPO / f).stat().st_size for f in tree.stdout.decode().split("\0") if f and (REPO / f).is_file())
    total = whl_bytes + data_bytes + tree_bytes
    print(f"total:  {mib(total)} with the working tree ({mib(tree_bytes)}); the device carries at most "
          f"{CARRY_LIMIT_MIB} MiB")
    if total > CARRY_LIMIT_MIB * 2**20:
        sys.exit(f"over the {CARRY_LIMIT_MIB} MiB the device carries: drop large untracked files from the working tree")


if __name__ == "__main__":
    main()
