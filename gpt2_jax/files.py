"""Writing files so that nothing half-written is ever read.

``write_atomic`` writes a file aside and renames it into place: a reader, or a process restarted
after a crash, sees the old file or the new one, never part of one. Cached derived data (trained
tokenizers, token streams) also carries a ``.sha256`` written after it: a file damaged since (bit
flip, truncation, crash between the two writes) no longer matches and is rebuilt, instead of, say,
a damaged token stream silently training on other data.
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
    """The content of ``path`` if it matches the hash written with it; None if it must be rebuilt
    (a mismatch, unlike a missing file, is also reported on stderr)."""
    path = pathlib.Path(path)
    try:
        content, expected = path.read_bytes(), _hash_path(path).read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    if hashlib.sha256(content).hexdigest() != expected:
        print(f"warning: cached file {path} is damaged (its SHA-256 does not match); rebuilding it",
              file=sys.stderr)
        return None
    return content
