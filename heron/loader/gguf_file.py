"""Reading a GGUF file: its metadata, its tensor table, and tensors dequantized to float32.

::

    "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata:     key (u64 length + utf-8) | value type u32 | value      (x metadata count)
    tensor table: name | n_dims u32 | dims u64 x n_dims | ggml type u32 | offset u64  (x tensor count)
    padding to ``general.alignment`` (32 by default)
    tensor data:  each tensor at data start + its offset, rows of quantized blocks

A model split by llama.cpp's ``gguf-split`` (or a converter's ``--split-max-size``) is one file
in several parts, ``NAME-00001-of-00003.gguf`` and on: the first holds the metadata, each part
a header (``split.no`` / ``split.count`` / ``split.tensors.count``) and its own tensor table
and data. ``GGUFFile.read`` of the first part reads them all (``split_parts``).

``gguf.GGUFReader`` builds a numpy view per array element, which for a 262k-token vocabulary
(three such arrays) takes seconds; here the header is walked once with ``struct`` over an mmap,
numeric arrays come out as numpy arrays and string arrays as lists of ``str``.

Dequantization uses gguf-py's own block formulas (``dequantize_rows``: the numbers are exactly
those of ``gguf.quants.dequantize``), except for Q8_0, the usual type of the embedding, done
in torch (the same single float32 multiply per element, so the same bits). It runs over
~256k-element runs of rows, cast one by one into the caller's dtype.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

if TYPE_CHECKING:  # imported where used: the tokenizer's path reads metadata only
    import torch

_VERSIONS = (2, 3)  # v1 (32-bit counts) is long gone from the wild
_DEFAULT_ALIGNMENT = 32
_U64 = struct.Struct("<Q")
_ARRAY_HEADER = struct.Struct("<IQ")  # element type, count
# GGUF value type -> struct format of one scalar (8 = string and 9 = array are read apart).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                   11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_READ_BYTES = 64 << 20  # a read into memory (--gguf-memory copy) at a time
_CHUNK_ELEMENTS = 1 << 18  # elements dequantized per step: float32 temporaries stay in cache
_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_SPLIT_COUNT, _SPLIT_NO, _SPLIT_TENSORS = "split.count", "split.no", "split.tensors.count"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are and how to read them."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # torch order (GGUF lists the fastest-moving dimension first)
    ggml_type: gguf.GGMLQuantizationType
    offset: int  # absolute, in bytes from the start of the file (of its part)
    nbytes: int
    part: int = 0  # which part of a split file holds it (``GGUFFile.parts``)


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata and tensor table (tensor data stays on disk until asked for).

    ``metadata`` values: ``int`` / ``float`` / ``bool`` / ``str`` scalars, numeric arrays as
    numpy arrays, string arrays as ``list[str]``. ``parts``: the files of a split model (the
    first is ``path``), else ``path`` alone.
    """

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    parts: tuple[Path, ...] = ()

    @classmethod
    def read(cls, path: Path) -> GGUFFile:
        parts = split_parts(path)
        metadata, tensors = _read_part(path, 0)
        count = int(metadata.get(_SPLIT_COUNT, 1))
        if count != len(parts):
            raise ValueError(f"{path} says it is {count} part(s) of a split GGUF file, its name "
                             f"{len(parts)}")
        for index, part in enumerate(parts[1:], start=1):
            part_metadata, part_tensors = _read_part(part, index)
            if int(part_metadata.get(_SPLIT_NO, -1)) != index:
                raise ValueError(f"{part} is not part {index + 1} of the split GGUF file {path}")
            tensors += part_tensors
        expected = int(metadata.get(_SPLIT_TENSORS, len(tensors)))
        if expected != len(tensors):
            raise ValueError(f"the {len(parts)} parts of {path} hold {len(tensors)} tensors, "
                             f"the first says {expected}")
        return cls(path, metadata, tensors, parts)

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def _part_path(self, info: TensorInfo) -> Path:
        return self.parts[info.part] if self.parts else self.path

    @cached_property
    def _mapped(self) -> dict[Path, np.ndarray]:
        """Each part's whole file, memory-mapped copy-on-write (never written: pages stay the
        page cache's, shared by every process that maps the file), on first use."""
        return {}

    @cached_property
    def _in_memory(self) -> dict[Path, tuple[np.ndarray, int]]:
        """Each part's tensor data read into anonymous memory (``_read_into_memory``), on first use."""
        return {}

    def block_rows(self, info: TensorInfo, in_memory: bool = False) -> torch.Tensor:
        """The tensor's stored rows as they lie in the file: [rows, row bytes] uint8, a view of
        the mapped file (no copy; it keeps the mapping alive), or with ``in_memory`` of the
        file's tensor data read into memory on huge pages (the same bytes)."""
        import torch

        row_elements = info.shape[-1] if info.shape else 1
        block_size, type_size = gguf.GGML_QUANT_SIZES[info.ggml_type]
        path = self._part_path(info)
        if in_memory:
            if path not in self._in_memory:
                self._in_memory[path] = _read_into_memory(path, self._part_start(info.part))
            source, base = self._in_memory[path]
        else:
            if path not in self._mapped:
                self._mapped[path] = np.memmap(path, dtype=np.uint8, mode="c")
            source, base = self._mapped[path], 0
        raw = source[info.offset - base:info.offset - base + info.nbytes]
        return torch.from_numpy(raw.reshape(-1, row_elements // block_size * type_size))

    def _part_start(self, part: int) -> int:
        return min((t.offset for t in self.tensors if t.part == part), default=0)

    def dequantized(self, info: TensorInfo, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor's values (bit for bit those of ``gguf.quants.dequantize``) in ``dtype``
        (default float32)."""
        raw = np.memmap(self._part_path(info), dtype=np.uint8, mode="c", offset=info.offset,
                        shape=(info.nbytes,))
        return dequantize(raw, info.ggml_type, info.shape, dtype)


def split_parts(path: Path) -> tuple[Path, ...]:
    """The files of the model ``path`` names: every part where its name is a split file's
    first part (``NAME-00001-of-00003.gguf``), else ``path`` alone. Raises on another part or
    a missing one, naming it."""
    match = _SPLIT_NAME.match(path.name)
    if match is None or int(match["count"]) < 2:
        return (path,)
    number, count = int(match["no"]), int(match["count"])
    if number != 1:
        first = path.with_name(f"{match['stem']}-00001-of-{match['count']}.gguf")
        raise ValueError(f"{path} is part {number} of {count} of a split GGUF file; pass its "
                         f"first part, {first}")
    parts = tuple(path.with_name(f"{match['stem']}-{i:05d}-of-{match['count']}.gguf")
                  for i in range(1, count + 1))
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise ValueError(f"{path} is the first of {count} parts of a split GGUF file; missing: "
                         f"{', '.join(missing)}")
    return parts


def _read_part(path: Path, part: int) -> tuple[dict[str, Any], tuple[TensorInfo, ...]]:
    """One file's metadata and tensor table (offsets absolute within that file)."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic bytes)")
        version, tensor_count, metadata_count = struct.unpack_from("<IQQ", buf, 4)
        if version not in _VERSIONS:
            raise ValueError(f"{path} is GGUF version {version}; heron reads versions 2 and 3")
        metadata, pos = _read_metadata(buf, 24, metadata_count)
        table, pos = _read_tensor_table(buf, pos, tensor_count)
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-pos // alignment) * alignment
    return metadata, tuple(_tensor_info(name, dims, type_id, data_start + offset, part)
                           for name, dims, type_id, offset in table)


def _read_into_memory(path: Path, start: int) -> tuple[np.ndarray, int]:
    """(the file's bytes from ``start`` on, read into anonymous memory on 2 MiB pages,
    ``start``): read once, the only copy this process holds."""
    from heron.heap import anonymous_huge

    data = anonymous_huge(path.stat().st_size - start)
    with path.open("rb") as handle:
        handle.seek(start)
        view, done = data.data, 0  # the array's buffer
        while done < len(data):
            read = handle.readinto(view[done:done + _READ_BYTES])
            if not read:
                raise OSError(f"{path}: the file ended {len(data) - done} bytes early")
            done += read
    return data, start


# ----------------------------------------------------------------------------- header


def _read_metadata(buf: mmap.mmap, pos: int, count: int) -> tuple[dict[str, Any], int]:
    metadata: dict[str, Any] = {}
    for _ in range(count):
        key, pos = _read_string(buf, pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = _read_value(buf, pos + 4, value_type)
    return metadata, pos


def _read_value(buf: mmap.mmap, pos: int, value_type: int) -> tuple[Any, int]:
    if value_type == _STRING:
        return _read_string(buf, pos)
    if value_type == _ARRAY:
        element_type, count = _ARRAY_HEADER.unpack_from(buf, pos)
        return _read_array(buf, pos + _ARRAY_HEADER.size, element_type, count)
    fmt = _scalar_format(value_type)
    (value,) = struct.unpack_from("<" + fmt, buf, pos)
    return value, pos + struct.calcsize(fmt)


def _read_array(buf: mmap.mmap, pos: int, element_type: int, count: int) -> tuple[Any, int]:
    if element_type == _STRING:
        return _read_strings(buf, pos, count)
    if element_type == _ARRAY:
        values = []
        for _ in range(count):  # nested arrays: rare and small
            element_type_inner, count_inner = _ARRAY_HEADER.unpack_from(buf, pos)
            value, pos = _read_array(buf, pos + _ARRAY_HEADER.size, element_type_inner, count_inner)
            values.append(value)
        return values, pos
    dtype = np.dtype("<" + _scalar_format(element_type))
    values = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).copy()
    return values, pos + count * dtype.itemsize


def _read_strings(buf: mmap.mmap, pos: int, count: int) -> tuple[list[str], int]:
    """``count`` length-prefixed strings: one pass, the hot loop of reading a vocabulary."""
    unpack = _U64.unpack_from
    strings: list[str] = []
    append = strings.append
    for _ in range(count):
        (length,) = unpack(buf, pos)
        pos += 8
        append(buf[pos:pos + length].decode("utf-8"))
        pos += length
    return strings, pos


def _read_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = _U64.unpack_from(buf, pos)
    pos += 8
    return buf[pos:pos + length].decode("utf-8"), pos + length


def _scalar_format(value_type: int) -> str:
    if value_type not in _SCALAR_FORMATS:
        raise ValueError(f"unknown GGUF metadata value type {value_type}")
    return _SCALAR_FORMATS[value_type]


def _read_tensor_table(buf: mmap.mmap, pos: int, count: int) -> tuple[list[tuple[str, tuple[int, ...], int, int]], int]:
    table = []
    for _ in range(count):
        name, pos = _read_string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        pos += 4 + 8 * n_dims
        type_id, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        table.append((name, dims, type_id, offset))
    return table, pos


def _tensor_info(name: str, dims: tuple[int, ...], type_id: int, offset: int,
                 part: int) -> TensorInfo:
    try:
        ggml_type = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        raise ValueError(f"GGUF tensor {name!r} has unknown ggml type {type_id}") from None
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
    return TensorInfo(name, tuple(int(d) for d in reversed(dims)), ggml_type, offset,
                      elements // block_size * type_size, part)


# ----------------------------------------------------------------------------- dequantization


def dequantize(raw: np.ndarray, ggml_type: gguf.GGMLQuantizationType, shape: tuple[int, ...],
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Raw GGUF bytes (``uint8``) -> tensor of ``shape``: the float32 values of
    ``gguf.quants.dequantize``, cast to ``dtype`` (default float32).

    Done a run of rows at a time (float32 run, then cast into the output), so a big tensor
    wanted in bfloat16 never exists in float32 as a whole.
    """
    import torch

    row_elements = shape[-1] if shape else 1
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    rows = raw.reshape(-1, row_elements // block_size * type_size)  # [n_rows, row bytes]
    out = torch.empty((rows.shape[0], row_elements), dtype=dtype or torch.float32)
    step = max(1, _CHUNK_ELEMENTS // row_elements)
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = _dequantize_rows(rows[start:start + step], ggml_type)
    return out.view(shape)


def _dequantize_rows(rows: np.ndarray, ggml_type: gguf.GGMLQuantizationType) -> torch.Tensor:
    """``[n, row bytes]`` uint8 -> ``[n, row elements]`` float32."""
    import torch

    if ggml_type == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(rows.view(np.float32))
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return torch.from_numpy(rows.view(np.float16)).to(torch.float32)
    if ggml_type == gguf.GGMLQuantizationType.Q8_0:
        return _dequantize_q8_0(rows)
    quant = getattr(gguf.quants, ggml_type.name, None)
    if quant is None or not hasattr(quant, "dequantize_rows"):
        raise ValueError(f"cannot dequantize GGUF tensors of type {ggml_type.name}")
    quant.init_grid()  # the lattice types (IQ*) need their grids; a no-op for the others
    return torch.from_numpy(quant.dequantize_rows(rows))


def _dequantize_q8_0(rows: np.ndarray) -> torch.Tensor:
    """Q8_0 blocks: fp16 scale d, then 32 int8 values q; value = q * d (one float32 multiply)."""
    import torch

    blocks = torch.from_numpy(rows).view(-1, 34)  # [n_blocks, 2 + 32]
    scale = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)  # [n_blocks, 1]
    values = blocks[:, 2:].view(torch.int8).to(torch.float32)  # [n_blocks, 32]
    return values.mul_(scale).view(rows.shape[0], -1)
