"""heron's GGUF block kernels (heron/kernels/cpu/gguf_matmul.c) against the gguf library's own
dequantization, for every block format and every kernel variant (all of them run on an
AVX-512 machine: the variants differ only in the instructions they are compiled for).

Exact mode (float32 activations): out equals x @ dequantize(W)^T up to float32 rounding.
int8 mode (activations quantized per row and group of 8): the error is at most
sum_k |a c|[n, k] s[m, k] / 2 (a c = W - b: the weight without its offset), s the group's
scale max |x| / 127, plus float rounding. Batches of 1-2 rows and larger ones take different
paths (a row of W at a time; panels of 16 rows); both must give the same bits.
"""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np
import pytest
import torch

from heron.kernels.cpu import build, isa
from heron.kernels.cpu.gguf import (
    BLOCK_FORMATS,
    BlockRows,
    GGUFKernels,
    gguf_kernels,
    segment_array,
)

VARIANTS = isa.runnable_variants(isa.cpu_features())
FORMATS = tuple(BLOCK_FORMATS)
BATCHES = (1, 2, 3, 7, 16, 130)


def _variant(name: str) -> object:
    """A variant as a test parameter: skipped (and marked with the features it needs, so the
    skip fails CI where the CPU has them: tests/conftest.py) where this CPU cannot run it."""
    return pytest.param(name, marks=[
        pytest.mark.cpu_features(*sorted(isa.SPECS[name].needs(isa.cpu_features()))),
        pytest.mark.skipif(name not in VARIANTS, reason=f"this CPU cannot run the {name} variant")])


ALL = [_variant(name) for name in isa.VARIANTS]


def test_every_variant_runs_here() -> None:
    """The test machines have AVX-512: every variant runs, avx2vnni where the CPU has VNNI too
    (AVX-512 VNNI on every machine CI has met; Skylake-SP lacks it, and there its tests skip)."""
    expected = tuple(name for name in isa.VARIANTS
                     if name != "avx2vnni" or isa.SPECS[name].needs(isa.cpu_features())
                     <= isa.cpu_features())
    assert VARIANTS == expected and {"avx512", "avx2", "portable"} <= set(VARIANTS), VARIANTS


def _fp16_field(scale: str, rng: np.random.Generator, n: int) -> np.ndarray:
    values = {"normal": rng.uniform(1e-3, 2e-2, n), "tiny": rng.uniform(6e-8, 1e-6, n),  # subnormal
              "large": rng.uniform(1e3, 6e4, n),
              "model": rng.uniform(2e-5, 2e-4, n)}[scale] * rng.choice([-1.0, 1.0], n)
    return values.astype(np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(fmt: str, rows: int, k: int, seed: int, scale: str = "normal") -> np.ndarray:
    """[rows, row bytes] of random blocks: random codes, fp16 scales of the given range."""
    type_id, elems, nbytes = BLOCK_FORMATS[fmt]
    rng = np.random.default_rng(seed)
    n = rows * k // elems
    blocks = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    if fmt in ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "IQ4_XS"):
        blocks[:, 0:2] = _fp16_field(scale, rng, n)
    elif fmt in ("Q4_1", "Q5_1"):  # d, then the (signed) offset m
        blocks[:, 0:2] = _fp16_field(scale, rng, n)
        blocks[:, 2:4] = _fp16_field(scale, rng, n)
    elif fmt == "Q2_K":  # d, then dmin (>= 0), last
        blocks[:, 80:82] = _fp16_field(scale, rng, n)
        blocks[:, 82:84] = np.abs(_fp16_field(scale, rng, n).view(np.float16)).view(np.uint8)
    elif fmt == "Q3_K":  # d last
        blocks[:, 108:110] = _fp16_field(scale, rng, n)
    elif fmt in ("Q4_K", "Q5_K"):
        blocks[:, 0:2] = _fp16_field(scale, rng, n)
        blocks[:, 2:4] = np.abs(_fp16_field(scale, rng, n).view(np.float16)).view(np.uint8)
    else:  # Q6_K: d last
        blocks[:, 208:210] = _fp16_field(scale, rng, n)
    return blocks.reshape(rows, k // elems * nbytes)


def dequantized(fmt: str, blocks: np.ndarray) -> torch.Tensor:
    qtype = gguf.GGMLQuantizationType[fmt]
    return torch.from_numpy(gguf.quants.dequantize(blocks, qtype).copy())  # [rows, K] float32


def offsets(fmt: str, blocks: np.ndarray) -> torch.Tensor:
    """The offsets b of each weight (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K; else 0): the blocks
    dequantized with every code zeroed (w = a c + b with c = 0)."""
    if fmt not in ("Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"):
        return torch.zeros(blocks.shape[0], blocks.shape[1] // BLOCK_FORMATS[fmt][2]
                           * BLOCK_FORMATS[fmt][1])
    nbytes = BLOCK_FORMATS[fmt][2]
    zeroed = blocks.reshape(-1, nbytes).copy()
    if fmt == "Q2_K":
        zeroed[:, 16:80] = 0  # qs
    else:
        zeroed[:, 4 if fmt in ("Q4_1", "Q5_1") else 16:] = 0  # the codes (Q5_1, Q5_K: qh too)
    return dequantized(fmt, zeroed.reshape(blocks.shape))


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[0, 3] = 40.0  # an outlier in one group
    return x


def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, exact: bool,
           b: torch.Tensor | None = None) -> None:
    """out against x @ w^T within the mode's bound (b: the weights' offsets, int8 mode)."""
    xd, wd = x.double(), w.double()
    expected = xd @ wd.T
    magnitude = xd.abs() @ wd.abs().T
    slack = 2e-5 * magnitude + 1e-30
    if not exact:  # the rounding of x to int8, per group of 8, times |a c| = |w - b|
        s = x.view(x.shape[0], -1, 8).abs().amax(dim=2, keepdim=True) / 127
        s = s.expand(-1, -1, 8).reshape(x.shape).double()
        scaled = wd if b is None else wd - b.double()
        slack = slack + (s / 2) @ scaled.abs().T
    err = (out.double() - expected).abs()
    worst = (err / slack).max().item()
    assert worst <= 1.0, f"error {worst:.3g}x the allowed bound"
    if not exact:
        assert (err > 2e-5 * magnitude).any() or x.shape[1] == 0  # not silently exact


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "int8"])
def test_matmul_equals_the_dequantized_weight(variant: str, fmt: str, exact: bool) -> None:
    kernels = gguf_kernels(variant)
    assert kernels is not None and kernels.variant == variant
    elems = BLOCK_FORMATS[fmt][1]
    k = 3 * elems if elems == 32 else 2 * elems  # 96: not a multiple of 64 (the padded tail)
    blocks = random_blocks(fmt, rows=37, k=k, seed=1)
    w, b = dequantized(fmt, blocks), offsets(fmt, blocks)
    segments = segment_array([BlockRows(torch.from_numpy(blocks), BLOCK_FORMATS[fmt][0])])
    for m in BATCHES:
        x = _activations(m, k, seed=m)
        out = kernels.matmul(x, segments, 37, exact, torch.float32)
        assert out.shape == (m, 37) and out.dtype == torch.float32
        _check(out, x, w, exact, b)


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("scale", ["tiny", "large"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_extreme_scales(variant: str, fmt: str, scale: str) -> None:
    kernels = gguf_kernels(variant)
    elems = BLOCK_FORMATS[fmt][1]
    # 32-element formats: K = 256 also (AVX2 reads those rows' blocks in place for 1-2 rows of x)
    for k in (2 * elems, 256) if elems == 32 else (2 * elems,):
        blocks = random_blocks(fmt, rows=19, k=k, seed=2, scale=scale)
        w, b = dequantized(fmt, blocks), offsets(fmt, blocks)
        segments = segment_array([BlockRows(torch.from_numpy(blocks), BLOCK_FORMATS[fmt][0])])
        for m in (1, 2, 5):  # a row of W at a time (or the row form); panels
            x = _activations(m, k, seed=5)
            for exact in (True, False):
                _check(kernels.matmul(x, segments, 19, exact, torch.float32), x, w, exact, b)


@pytest.mark.parametrize("variant", ALL)
def test_mixed_segments_bf16_in_and_out(variant: str) -> None:
    """A fused q/k/v: three formats stacked along N; bf16 activations and output."""
    kernels = gguf_kernels(variant)
    k = 512
    parts = [("Q5_0", 33), ("Q4_K", 16), ("Q8_0", 7), ("Q2_K", 9), ("Q6_K", 5)]
    blocks = [random_blocks(fmt, rows, k, seed=i) for i, (fmt, rows) in enumerate(parts)]
    w = torch.cat([dequantized(fmt, b) for (fmt, _), b in zip(parts, blocks)])
    b = torch.cat([offsets(fmt, b) for (fmt, _), b in zip(parts, blocks)])
    segments = segment_array([BlockRows(torch.from_numpy(b), BLOCK_FORMATS[fmt][0])
                              for (fmt, _), b in zip(parts, blocks)])
    for m in (1, 2, 19):  # panels of 16 rows cross the segments' boundaries (33, 49, 56, 65)
        x = _activations(m, k, seed=3).to(torch.bfloat16)
        for exact in (True, False):
            out = kernels.matmul(x, segments, w.shape[0], exact, torch.bfloat16)
            assert out.dtype == torch.bfloat16 and out.shape == (m, w.shape[0])
            full = kernels.matmul(x, segments, w.shape[0], exact, torch.float32)
            torch.testing.assert_close(out, full.to(torch.bfloat16), atol=0, rtol=0)  # one rounding
            _check(full, x.float(), w, exact, b)
        rows = slice(m // 2, m // 2 + 1)  # the same bits alone
        assert torch.equal(kernels.matmul(x[rows], segments, w.shape[0], False, torch.float32),
                           kernels.matmul(x, segments, w.shape[0], False, torch.float32)[rows])


@pytest.mark.parametrize("variant", ALL)
def test_bf16_output_rounds_each_value_once_ties_nan_and_inf_included(variant: str) -> None:
    """Whole tiles of bf16 output are converted in vectors, partial ones value by value: both
    round to nearest even as torch does (ties too), keep infinities and give quiet NaNs."""
    kernels = gguf_kernels(variant)
    k, n = 64, 45  # tiles of 16 / 8 / 16 lanes and a partial one
    rng = np.random.default_rng(7)
    blocks = np.zeros((n, k // 32, 34), dtype=np.uint8)
    blocks[:, :, 0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)  # d = 1
    blocks[:, :, 2:] = rng.integers(-1, 2, size=(n, k // 32, 32)).astype(np.int8).view(np.uint8)
    segments = segment_array([BlockRows(torch.from_numpy(blocks.reshape(n, -1)),
                                        BLOCK_FORMATS["Q8_0"][0])])
    x = torch.from_numpy(rng.integers(-127, 128, size=(4, k)).astype(np.float32))
    x[0, ::8] = 127  # x's scales 1 in int8 mode: row 0's results are exact integers
    x[1, 5] = float("nan")
    x[2] *= 1e30
    x[3] *= 2e36  # sums beyond float32's range
    for exact in (True, False):
        out = kernels.matmul(x, segments, n, exact, torch.bfloat16)
        full = kernels.matmul(x, segments, n, exact, torch.float32)
        nan = full.isnan()
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out[~nan], full[~nan].to(torch.bfloat16))
        assert (out[nan].view(torch.int16) & 0x7FC0).eq(0x7FC0).all()  # quiet
        ties = (full[0].view(torch.int32) & 0xFFFF) == 0x8000  # halfway between two bf16s
        assert torch.equal(full[0], full[0].round()) and ties.sum() >= 3
        assert out[2].isfinite().all() and out[3].isinf().any()
        if exact:  # (int8 mode's codes of a NaN are not defined)
            assert nan[1].all()


@pytest.mark.parametrize("variant", ALL)
def test_the_result_does_not_depend_on_the_threads(variant: str) -> None:
    """Rows and panels are handed to the threads in ranges of shrinking size (guided): one
    thread or two, the same bits, across segments of several formats."""
    kernels = gguf_kernels(variant)
    k = 256
    parts = [("Q5_0", 301), ("Q6_K", 77), ("Q8_0", 130), ("Q2_K", 23), ("Q4_K", 45)]
    blocks = [random_blocks(fmt, rows, k, seed=10 + i) for i, (fmt, rows) in enumerate(parts)]
    w = torch.cat([dequantized(fmt, b) for (fmt, _), b in zip(parts, blocks)])
    b = torch.cat([offsets(fmt, b) for (fmt, _), b in zip(parts, blocks)])
    segments = segment_array([BlockRows(torch.from_numpy(b), BLOCK_FORMATS[fmt][0])
                              for (fmt, _), b in zip(parts, blocks)])
    previous = torch.get_num_threads()
    try:
        for m in (1, 2, 16):
            x = _activations(m, k, seed=m)
            for exact in (True, False):
                results = []
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    results.append(kernels.matmul(x, segments, w.shape[0], exact, torch.float32))
                assert torch.equal(results[0], results[1]), (m, exact)
                _check(results[1], x, w, exact, b)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_are_the_dequantized_rows(variant: str, fmt: str) -> None:
    kernels = gguf_kernels(variant)
    k = BLOCK_FORMATS[fmt][1] * 2
    blocks = random_blocks(fmt, rows=50, k=k, seed=4)
    w = dequantized(fmt, blocks)
    segment = BlockRows(torch.from_numpy(blocks), BLOCK_FORMATS[fmt][0]).struct()
    ids = torch.tensor([49, 0, 7, 7, 23])
    rows = kernels.rows(segment, k, ids, torch.float32)
    assert torch.equal(rows, w[ids])  # bit for bit: the same float32 operations as gguf's
    assert torch.equal(kernels.rows(segment, k, ids, torch.bfloat16), rows.to(torch.bfloat16))


def test_bad_shapes_are_refused() -> None:
    kernels = gguf_kernels("portable")
    blocks = random_blocks("Q4_K", rows=4, k=256, seed=0)
    segments = segment_array([BlockRows(torch.from_numpy(blocks), BLOCK_FORMATS["Q4_K"][0])])
    with pytest.raises(ValueError, match="whole number of blocks"):
        kernels.matmul(torch.randn(1, 128), segments, 4, True, torch.float32)
    with pytest.raises(ValueError, match="out of range"):
        kernels.rows(segments[0], 256, torch.tensor([4]), torch.float32)
    # the microbenchmark's timing loop checks the shapes as each call does
    with pytest.raises(ValueError, match="gguf_matmul: .*whole number of blocks"):
        kernels.seconds_per_call(torch.randn(1, 128), segments, 4, False, 3)
    assert kernels.seconds_per_call(torch.randn(2, 256), segments, 4, False, 3) > 0


@pytest.mark.parametrize("variant", ALL)
def test_float_segments_and_row_ids(variant: str) -> None:
    """A fused weight with float parts (F32, F16, BF16 rows, multiplied in float32 in both
    modes) and a quantized part read through a row permutation."""
    kernels = gguf_kernels(variant)
    k, gen = 64, torch.Generator().manual_seed(9)
    floats = [torch.randn(5, k, generator=gen).to(dtype) for dtype in
              (torch.float32, torch.float16, torch.bfloat16)]
    blocks = random_blocks("Q4_0", rows=6, k=k, seed=8)
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    parts = [BlockRows(t.view(torch.uint8).view(5, -1), type_id)
             for t, type_id in zip(floats, (0, 1, 30))]
    parts.append(BlockRows(torch.from_numpy(blocks), BLOCK_FORMATS["Q4_0"][0], row_ids=perm))
    w = torch.cat([t.float() for t in floats] + [dequantized("Q4_0", blocks)[perm]])
    x = _activations(4, k, seed=1)
    for exact in (True, False):
        out = kernels.matmul(x, segment_array(parts), w.shape[0], exact, torch.float32)
        _check(out[:, :15], x, w[:15], exact=True)  # float rows: float32 in both modes
        _check(out[:, 15:], x, w[15:], exact)
    assert torch.equal(kernels.rows(parts[3].struct(), k, torch.tensor([0, 5]), torch.float32),
                       w[[15, 20]])


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "int8"])
@pytest.mark.parametrize("blocks_per_row", [1, 3, 6, 8])
def test_a_rows_result_does_not_depend_on_its_batch(variant: str, fmt: str, exact: bool,
                                                    blocks_per_row: int) -> None:
    """Bit for bit the same output for a row of x alone, in a small batch (the decode path) and
    in a large one (the general path): what a request gets never depends on who it shares a
    step with. K: padded to 128 or not; the 32-element formats decoded in registers or not."""
    kernels = gguf_kernels(variant)
    k = BLOCK_FORMATS[fmt][1] * blocks_per_row
    blocks = random_blocks(fmt, rows=21, k=k, seed=6)
    segments = segment_array([BlockRows(torch.from_numpy(blocks), BLOCK_FORMATS[fmt][0])])
    x = _activations(40, k, seed=2)
    full = kernels.matmul(x, segments, 21, exact, torch.float32)
    for rows in (slice(0, 1), slice(5, 7), slice(9, 13), slice(20, 37)):
        assert torch.equal(kernels.matmul(x[rows], segments, 21, exact, torch.float32), full[rows])


@pytest.mark.parametrize("variant", ALL)
def test_a_long_batch_in_passes(variant: str) -> None:
    """A batch whose codes of x outgrow a pass (512 KB: 64 rows of K = 8192) is multiplied in
    passes of rows, each over all of W's panels: the same bits as its rows alone, with float
    rows (x kept in float32 for them) and segments of several formats."""
    kernels = gguf_kernels(variant)
    k, gen = 8192, torch.Generator().manual_seed(12)
    parts = [("Q4_K", 21), ("Q8_0", 18), ("Q5_0", 9)]
    blocks = [random_blocks(fmt, rows, k, seed=20 + i) for i, (fmt, rows) in enumerate(parts)]
    floats = torch.randn(3, k, generator=gen).to(torch.float16)
    rows = [BlockRows(torch.from_numpy(b), BLOCK_FORMATS[fmt][0]) for (fmt, _), b in zip(parts, blocks)]
    rows.insert(1, BlockRows(floats.view(torch.uint8).view(3, -1), 1))
    w = torch.cat([dequantized("Q4_K", blocks[0]), floats.float()]
                  + [dequantized(fmt, b) for (fmt, _), b in zip(parts[1:], blocks[1:])])
    b = torch.cat([offsets("Q4_K", blocks[0]), torch.zeros(3, k)]
                  + [offsets(fmt, b) for (fmt, _), b in zip(parts[1:], blocks[1:])])
    segments, n = segment_array(rows), w.shape[0]
    x = _activations(150, k, seed=5)  # passes of 64, 64 and 22 rows
    full = kernels.matmul(x, segments, n, False, torch.float32)
    _check(full[:, :21], x, w[:21], False, b[:21])
    _check(full[:, 21:24], x, w[21:24], exact=True)
    _check(full[:, 24:], x, w[24:], False, b[24:])
    for part in (slice(0, 3), slice(63, 66), slice(100, 117), slice(140, 150)):
        assert torch.equal(kernels.matmul(x[part], segments, n, False, torch.float32), full[part])


@pytest.fixture(scope="module")
def avx512_without_vnni() -> Iterator[GGUFKernels]:
    """The avx512 variant built as for a CPU without AVX-512 VNNI (VPMADDUBSW instead of
    VPDPBUSD): the features the build sees, and so its flags and cache key, lack it."""
    features = isa.cpu_features() - {"avx512_vnni"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(isa, "cpu_features", lambda: features)
        patch.setattr(build, "cpu_features", lambda: features)
        build._load.cache_clear()
        lib = build.load_library("gguf_matmul", ("gguf_matmul",), "avx512")
        build._load.cache_clear()
    assert lib is not None
    yield GGUFKernels(lib, "avx512")


@pytest.mark.parametrize("fmt", FORMATS)
def test_avx512_without_vnni(avx512_without_vnni: GGUFKernels, fmt: str) -> None:
    kernels, with_vnni = avx512_without_vnni, gguf_kernels("avx512")
    k = BLOCK_FORMATS[fmt][1] * (4 if BLOCK_FORMATS[fmt][1] == 32 else 1)
    blocks = random_blocks(fmt, rows=40, k=k, seed=7)
    w, b = dequantized(fmt, blocks), offsets(fmt, blocks)
    segments = segment_array([BlockRows(torch.from_numpy(blocks), BLOCK_FORMATS[fmt][0])])
    x = _activations(20, k, seed=8)
    full = kernels.matmul(x, segments, 40, False, torch.float32)
    _check(full, x, w, False, b)
    assert torch.equal(full, with_vnni.matmul(x, segments, 40, False, torch.float32))  # same sums
    for rows in (slice(0, 1), slice(3, 5)):
        assert torch.equal(kernels.matmul(x[rows], segments, 40, False, torch.float32), full[rows])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.cpu_features(*sorted(isa.SPECS["avx2vnni"].needs(isa.cpu_features())))
@pytest.mark.skipif("avx2vnni" not in VARIANTS, reason="this CPU cannot run the avx2vnni variant")
def test_avx2vnni_equals_avx2(fmt: str) -> None:
    """The avx2vnni variant sums the same integer products with VPDPBUSD that the avx2 variant
    sums with VPMADDUBSW / VPMADDWD (its panels, the row form and the rows read straight from
    Q4_0 / Q5_0 / Q8_0 blocks): every result is the same, bit for bit."""
    vnni, plain = gguf_kernels("avx2vnni"), gguf_kernels("avx2")
    assert vnni is not None and plain is not None and vnni.variant == "avx2vnni"
    elems = BLOCK_FORMATS[fmt][1]
    k = 512 if elems == 256 else 384  # a multiple of 128: the straight-from-blocks row form too
    blocks = random_blocks(fmt, rows=45, k=k, seed=11, scale="model")
    segments = segment_array([BlockRows(torch.from_numpy(blocks), BLOCK_FORMATS[fmt][0])])
    w, b = dequantized(fmt, blocks), offsets(fmt, blocks)
    for m in (1, 2, 3, 16, 130):
        x = _activations(m, k, seed=m)
        out = vnni.matmul(x, segments, 45, False, torch.float32)
        _check(out, x, w, False, b)
        assert torch.equal(out, plain.matmul(x, segments, 45, False, torch.float32)), m
