"""Weight-only quantization (heron.layers.quant): codes within half a step, the kernel reads
them as fitted, small batches take the quantized copy, and the default model stays within the
stated tolerance of the float32 reference."""

from __future__ import annotations

import pytest
import torch

from heron.bench.accuracy import decode_error
from heron.kernels import cpu as cpu_kernels
from heron.layers.linear import Linear, linear
from heron.layers.quant import (
    GROUP_SIZE,
    PackedWeight,
    Q8Weight,
    quantize_int4,
    quantize_int8,
    quantize_model,
)

# heron's own int8 kernel builds wherever a C compiler does (one variant per instruction set);
# elsewhere int8 falls back to PyTorch's int4 kernel.
Q8_CPU = cpu_kernels.q8_gemm() is not None


def _weight(n: int = 64, k: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, 5] = 0.9  # an outlier: group scales keep it from spoiling the rest of its row
    return w.to(torch.bfloat16)


def _groups(w: torch.Tensor) -> torch.Tensor:
    return w.float().view(w.shape[0], -1, GROUP_SIZE)  # [N, G, 32]


def test_int8_codes_are_within_half_a_step_of_the_weight() -> None:
    w = _weight()
    deq = quantize_int8(w, max_rows=8).dequantize()
    step = _groups(w).abs().amax(dim=2, keepdim=True) / 127  # [N, G, 1]
    err = (_groups(deq) - _groups(w)).abs()
    # half a step, plus one bfloat16 ulp: the kernel rounds its output (read back through it)
    assert (err <= step * 0.5 + _groups(w).abs() * 2 ** -7 + 1e-6).all()
    row_step = 0.9 / 127  # what one scale for the whole row 3 would allow
    assert err[3, 1:].max() < row_step / 4  # its other groups keep their own, finer steps


def test_int4_codes_are_within_half_a_step_of_the_weight() -> None:
    w = _weight()
    deq = quantize_int4(w, max_rows=8).dequantize()
    g = _groups(w)
    step = (g.amax(dim=2, keepdim=True) - g.amin(dim=2, keepdim=True)) / 15
    assert ((_groups(deq) - g).abs() <= step * 0.5 + g.abs() * 2 ** -7 + 1e-6).all()


@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4])
def test_kernel_output_equals_the_dequantized_weight(quantize) -> None:
    w = _weight(n=48, k=64, seed=1)
    q = quantize(w, max_rows=8)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    expected = x.float() @ q.dequantize().t()
    torch.testing.assert_close(q.matmul(x).float(), expected, atol=0.02, rtol=0.01)


def test_int8_uses_herons_kernel_where_it_builds() -> None:
    q = quantize_int8(_weight(), max_rows=8)
    assert isinstance(q, Q8Weight if Q8_CPU else PackedWeight)
    assert isinstance(quantize_int8(_weight().float(), max_rows=8), Q8Weight if Q8_CPU else PackedWeight)


@pytest.mark.cpu_features()  # a skip with a C compiler at hand fails (tests/conftest.py)
@pytest.mark.skipif(not Q8_CPU, reason="no C compiler: heron's int8 kernel cannot be built")
@pytest.mark.parametrize("variant", cpu_kernels.isa.VARIANTS)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 21])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_q8_kernel_matches_the_dequantized_weight_for_every_tile_shape(rows, out_dtype, variant,
                                                                        monkeypatch) -> None:
    monkeypatch.setenv(cpu_kernels.isa.ISA_ENV_VAR, variant)
    # N = 48: three blocks of 16 outputs; rows cover 1..8-row tiles and their sums.
    w = _weight(n=48, k=96, seed=3)
    q = quantize_int8(w, max_rows=32)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)[:, 16:112]  # strided rows
    out = q.matmul(x, out_dtype)
    assert out.dtype == out_dtype and out.shape == (rows, 48)
    _assert_within_activation_rounding(out, x, q)
    codes, scales = q.row_codes()
    codes = codes.float().view(48, 3, 32)
    assert torch.equal(codes.abs().amax(dim=2), torch.full((48, 3), 127.0))
    assert scales.shape == (48, 3) and scales.dtype == torch.float16


def _assert_within_activation_rounding(out: torch.Tensor, x: torch.Tensor, q: Q8Weight) -> None:
    """The kernel quantizes x per row and group of 32 (GGUF's Q8_0): each input is off by at most
    half a step (max |x| / 127 / 2), so each output by at most that times its weights' |sum| per
    group, plus the output's own rounding."""
    rows, k = x.shape
    w = q.dequantize()  # [N, K]
    half_step = x.float().view(rows, k // 32, 32).abs().amax(dim=2) / 254  # [rows, G]
    bound = half_step @ w.abs().view(w.shape[0], k // 32, 32).sum(dim=2).t()  # [rows, N]
    err = (out.float() - x.float() @ w.t()).abs()
    rounding = 0 if out.dtype == torch.float32 else out.float().abs() * 2 ** -8
    assert (err <= bound * 1.001 + rounding + 1e-5).all(), (err - bound).max()
    assert err.max() > 0  # the activations really were quantized


@pytest.mark.cpu_features()
@pytest.mark.skipif(not Q8_CPU, reason="no C compiler: heron's int8 kernel cannot be built")
def test_q8_kernel_takes_float32_activations_and_a_prefill_sized_batch() -> None:
    q = quantize_int8(_weight(n=64, k=640, seed=5), max_rows=10_000)
    x = torch.randn(300, 640, generator=torch.Generator().manual_seed(6))
    out = q.matmul(x)
    assert out.dtype == torch.float32 and out.shape == (300, 64)
    _assert_within_activation_rounding(out, x, q)


def test_kernels_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV_VAR, "0")
    cpu_kernels.q8_gemm.cache_clear()
    try:
        assert cpu_kernels.q8_gemm() is None
        assert isinstance(quantize_int8(_weight(), max_rows=8), PackedWeight)
    finally:
        monkeypatch.delenv(cpu_kernels.DISABLE_ENV_VAR)
        cpu_kernels.q8_gemm.cache_clear()


def test_small_batches_use_the_quantized_copy_and_large_ones_the_float_weight() -> None:
    layer = Linear(64, 32).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(_weight(32, 64))
    assert quantize_model(layer, "int8", max_rows=4) > 0
    with torch.no_grad():
        layer.weight.zero_()  # only the quantized copy still knows the weight
    x = torch.randn(8, 64).to(torch.bfloat16)
    assert layer(x[:4]).abs().sum() > 0
    assert layer(x).abs().sum() == 0
    assert torch.equal(layer(x[:4]), linear(x[:4], layer.weight, None, layer.quantized))


def test_unsupported_shapes_stay_float() -> None:
    layer = Linear(64, 24).to(torch.bfloat16)  # the CPU kernel needs N % 16 == 0
    assert quantize_model(layer, "int8") == 0 and layer.quantized is None
    with pytest.raises(ValueError, match="unknown quantization 'fp3'"):
        quantize_model(layer, "fp3")


@pytest.mark.slow
def test_default_model_auto_decode_is_within_the_stated_tolerance_of_float32() -> None:
    """The README's tolerance for the default (auto) mode, the file's blocks with bf16
    activations quantized to int8 per group of 8: decode log-probs within mean 0.03 / max 0.3
    nats of the exact float32 model (measured 0.019 / 0.147; per group of 4 it was 0.016 /
    0.121, per group of 32 0.029 / 0.42)."""
    from heron import LLM

    reference = LLM(dtype="float32")  # the same blocks, float32 activations: exact products
    auto = LLM()
    assert auto.engine.quantization == "gguf" and auto.engine.dtype == torch.bfloat16
    err = decode_error(auto, reference)
    assert err.mean() <= 0.03 and err.max() <= 0.3, (err.mean(), err.max())


def test_float32_weights_serve_bf16_batches_the_quantized_copy_does_not() -> None:
    import sys

    from heron.layers.linear import keep_float32_weights

    plain, covered = Linear(64, 32, bias=True).to(torch.bfloat16), Linear(64, 32).to(torch.bfloat16)
    with torch.no_grad():
        plain.weight.copy_(_weight(32, 64))
        covered.weight.copy_(_weight(32, 64))
    quantize_model(covered, "int8", max_rows=sys.maxsize)
    before = plain.weight.float().clone()
    assert keep_float32_weights(torch.nn.Sequential(plain, covered)) == 32 * 64 * 2
    assert plain.weight.dtype == plain.bias.dtype == torch.float32 and torch.equal(plain.weight, before)
    assert covered.weight.dtype == torch.bfloat16  # never read: left as it was
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    out = plain(x)
    assert out.dtype == torch.bfloat16
    expected = (x.float() @ before.t() + plain.bias.float()).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=2 ** -7)  # float32 math, one bf16 rounding
