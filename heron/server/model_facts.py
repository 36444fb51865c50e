"""What a model catalogue shows about the served model (Ollama's /api/tags, /api/show, /api/ps):
its file format, family, parameter count, quantization, size on disk, digest and date.

Read once when the server starts, from file headers only (no weights): a GGUF file's metadata
and tensor table; a Hugging Face directory's config.json and safetensors headers.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from heron.config import ModelConfig

_HEADER_LIMIT = 100 * 2**20  # a safetensors header longer than this is not read


@dataclass(frozen=True)
class ModelFacts:
    """The served model's catalogue entry. ``digest``: for a GGUF file its sha256; for a
    directory the sha256 of its weight files' names, sizes and times (not their bytes)."""

    format: str  # "gguf" | "safetensors"
    family: str  # "gemma3", "llama", "qwen2"...
    parameter_count: int  # 0 when unknown
    quantization: str  # "Q4_K_M", "BF16"...
    size: int  # bytes on disk
    digest: str
    modified_at: datetime


def read_model_facts(model_config: ModelConfig) -> ModelFacts:
    """The facts of ``--model`` (its files must be on disk already: the engine loaded them)."""
    from heron.loader import resolve_source

    source = resolve_source(model_config.model, download_weights=False)
    if source.is_gguf:
        return _gguf_facts(source.path, source.gguf_sha256)
    return _directory_facts(source.path)


def adapter_facts(base: ModelFacts, adapter_path: str) -> ModelFacts:
    """A LoRA adapter served beside the model, as Ollama lists a model built with ``ADAPTER``:
    the base's facts, the adapter's files added to its size, the newer of their times, and
    a digest of the base's and the adapter files' names, sizes and times."""
    directory = Path(adapter_path)
    files = sorted(p for p in directory.glob("adapter_*") if p.is_file())
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    digest = hashlib.sha256(json.dumps([base.digest, str(directory), stamp]).encode()).hexdigest()
    return replace(base, size=base.size + sum(s for _, s, _ in stamp), digest=digest,
                   modified_at=max(base.modified_at, _modified(files)))


def _modified(paths: list[Path]) -> datetime:
    newest = max((p.stat().st_mtime for p in paths), default=0.0)
    return datetime.fromtimestamp(newest, timezone.utc)


def _gguf_facts(path: Path, sha256: str | None) -> ModelFacts:
    import gguf

    from heron.loader.gguf import gguf_digest
    from heron.loader.gguf_file import GGUFFile

    file = GGUFFile.read(path)  # every part of a split file
    file_type = file.metadata.get("general.file_type", -1)
    try:
        quantization = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except ValueError:  # absent, or a type this gguf package does not know
        quantization = "unknown"
    return ModelFacts(
        format="gguf", family=file.architecture,
        parameter_count=sum(math.prod(t.shape) for t in file.tensors),
        quantization=quantization, size=sum(part.stat().st_size for part in file.parts),
        digest=sha256 or gguf_digest(path), modified_at=_modified(list(file.parts)))


def _directory_facts(directory: Path) -> ModelFacts:
    config = json.loads((directory / "config.json").read_text())
    files = sorted(directory.glob("*.safetensors"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    dtype = config.get("torch_dtype") or config.get("dtype") or "unknown"
    return ModelFacts(
        format="safetensors", family=str(config.get("model_type", "unknown")),
        parameter_count=sum(_safetensors_parameters(p) for p in files),
        quantization=str(dtype).upper(), size=sum(s for _, s, _ in stamp),
        digest=hashlib.sha256(json.dumps(stamp).encode()).hexdigest(),
        modified_at=_modified(files or [directory / "config.json"]))


def _safetensors_parameters(path: Path) -> int:
    """Elements in one shard, from its JSON header."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > _HEADER_LIMIT:
            return 0
        header = json.loads(handle.read(length))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
