"""Files that survive a crash: a text or JSON file replaced atomically, a symlink moved
atomically, a directory fsynced. The turn log's consumer offsets, the policy store's records
and served link, a trainer's state and the oracle labeller's stores all are written this way,
so a crash leaves the old content or the new, never half of either."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"  # temp files start with it: listings of a directory skip them


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a file created or renamed in it survives a machine crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Write `text` to `path` atomically: a temp file beside it (named `TMP_PREFIX...`),
    fsynced, then renamed over it; with `durable`, the directory fsynced too, so the rename
    itself survives a crash."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Mapping[str, Any], *, durable: bool = True) -> None:
    """`data` as indented JSON, written by `write_text_atomic`."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n", durable=durable)


def replace_link(link: Path, target: str | Path, *, durable: bool = True) -> None:
    """Point the symlink `link` at `target` (a new link renamed over the old: a reader sees
    one or the other); with `durable`, the directory fsynced too."""
    tmp = link.parent / f"{TMP_PREFIX}link-{uuid.uuid4().hex}"
    os.symlink(target, tmp)
    os.replace(tmp, link)
    if durable:
        fsync_dir(link.parent)
