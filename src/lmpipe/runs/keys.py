"""Keys of what a cached or resumable result depends on: one scheme for the stage
checkpoints, the SFT phase, the preference pair tables and the selection score tables.

A key is a digest of a JSON payload (sorted keys; values JSON cannot hold are written as
their str), so equal settings give equal keys on every machine and in every process. A
model enters a key by `directory_digest`, its files' names and contents."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

KEY_CHARS = 16


def key_of(payload: Mapping[str, Any] | Any) -> str:
    """A short, stable digest of `payload`."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=KEY_CHARS // 2).hexdigest()


def directory_digest(path: Path) -> str:
    """blake2b of a directory's file names and contents (a model, a tokenizer)."""
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def keyed_path(directory: Path, payload: Mapping[str, Any], suffix: str = "") -> Path:
    """Where the result of `payload` lives under `directory`."""
    return directory / f"{key_of(payload)}{suffix}"
