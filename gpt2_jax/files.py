"""Writing files so that nothing half-written is ever read.

``write_atomic`` writes a whole file aside and renames it into place: a reader (or a process
restarted after a crash) sees the old file or the new one, never part of one. Every small file
the package writes whole goes through it: run.json, tokenizer.json, rewritten metric logs,
Hugging Face config files.

Cached derived data (trained tokenizers, token streams) also checks itself when read: each cached file ``X`` has a ``X.sha256`` beside it, written after ``X``: a file that was damaged
since (a bit flip, a truncation, a crash between the two writes) no longer matches its hash and
is rebuilt by the caller instead of being used. Without the check, a damaged token stream would
still load and silently train on other data.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys


def _hash_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def write_atomic(path: str | os.PathLike, content: bytes | str) -> None:
    """Write ``content`` (str: as UTF-8) at ``path`` in one piece, creating the folder if needed."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    os.replace(tmp, path)


def write_verified(path: str | os.PathLike, content: bytes) -> None:
    """Write ``content`` at ``path`` atomically, then its SHA-256 beside it."""
    path = pathlib.Path(path)
    write_atomic(path, content)
    write_atomic(_hash_path(path), hashlib.sha256(content).hexdigest() + "\n")


def read_verified(path: str | os.PathLike) -> bytes | None:
    """The content of ``path`` if it matches the hash written with it; None if it must be rebuilt.

    A missing file or hash is a plain miss; a mismatch is also reported on stderr, once per file.
    """
    path = pathlib.Path(path)
    try:
        content, expected = path.read_bytes(), _hash_path(path).read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    if hashlib.sha256(content).hexdigest() != expected:
        print(f"warning: cached file {path} is damaged (its SHA-256 does not match); rebuilding it", file=sys.stderr)
        return None
    return content
