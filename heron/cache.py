"""heron's on-disk cache: where it is, its format version, atomic writes, file digests.

::

    <HERON_CACHE_DIR or ~/.cache/heron>/
        digests/<hash of the path>.json   sha256 of a file, valid while its size and mtime hold
        v<CACHE_FORMAT>/<sha256>/          products of one GGUF file (see ``gguf``)

Entries are keyed by content (the file's sha256) under a format version: a heron that writes
a different layout bumps ``CACHE_FORMAT`` and never reads entries of another format.
Every entry is written under a temporary name and renamed into place, so a killed process
never leaves a half-written entry that a later start would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CACHE_ENV_VAR = "HERON_CACHE_DIR"
# 2: weights no longer cached for serving (dequantized from the GGUF at load), tokenizer and
# config built by heron from the GGUF metadata.
# 3: config with the file's RoPE scaling, byte-level BPE tokenizers built by heron, SentencePiece
# space prefix as llama.cpp, eos ids with <|end_of_text|> and the file's EOT / EOM ids.
# 4: config with attention_bias / mlp_bias (or heron's qkv_bias) where the file has those bias tensors.
# 5: byte-level BPE tokenizers for more pre-tokenizers (deepseek-llm, deepseek-coder, smollm,
# tekken, deepseek-r1-qwen, falcon3, pixtral, smaug-bpe, dbrx), which transformers built wrong.
CACHE_FORMAT = 5
_HASH_CHUNK = 1 << 20
_STALE_AFTER_S = 3600.0  # a temporary this old belongs to a process that died


def cache_root() -> Path:
    """``$HERON_CACHE_DIR``, else ``~/.cache/heron``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "heron"


def entry_dir(sha256: str, root: Path | None = None) -> Path:
    """The cache entry of the file with this digest, in the current cache format."""
    return (root or cache_root()) / f"v{CACHE_FORMAT}" / sha256


# ----------------------------------------------------------------------------- atomic writes


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory + rename."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` a temporary file next to ``path``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp makes it private; the cache is as readable as any download
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_dir(path: Path, fill: Callable[[Path], object]) -> None:
    """Build a directory under a temporary name, then rename it to ``path`` (first one wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(directory: Path) -> None:
    """Delete temporaries that a killed process left behind (old enough to be nobody's)."""
    if not directory.is_dir():
        return
    cutoff = time.time() - _STALE_AFTER_S
    for entry in directory.glob(".*.tmp"):
        try:
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        except OSError:  # another process cleaned it up first
            pass


# ----------------------------------------------------------------------------- digests


def file_sha256(path: Path, root: Path | None = None) -> str:
    """The sha256 of ``path``, remembered on disk per (path, size, mtime) to skip rehashing."""
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    memo = (root or cache_root()) / "digests" / f"{key}.json"
    if memo.is_file():
        remembered = json.loads(memo.read_text())
        if {k: remembered.get(k) for k in stamp} == stamp:
            return str(remembered["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    atomic_write_text(memo, json.dumps({**stamp, "sha256": digest.hexdigest()}))
    return digest.hexdigest()
