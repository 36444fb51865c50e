"""The DRAM roofline of decoding: weight bytes one decode step reads, and the box's read bandwidth.

At batch 1 a decode step streams every weight once, so no server can beat
``read bandwidth / weight bytes per token`` tokens per second (the roofline); a server's c=1
throughput as a fraction of it says how close it comes to the memory system's limit.

Weight bytes per token are counted from the GGUF file's tensor table (the bytes as stored:
quantized blocks stay quantized): every tensor in full, except the token embedding, of which a
step reads one row for its lookup, plus the whole matrix again when it is the tied LM head (no
``output.weight``).

The read bandwidth comes from a small C program (``cc -O3 -march=native``, one thread per
core, each summing its own part of a buffer far larger than the last-level cache, best of
several passes); without a C compiler, from numpy sums over the same split, in threads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from heron.loader.gguf_file import GGUFFile

EMBEDDING, LM_HEAD = "token_embd.weight", "output.weight"
MB = 1e6


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes of weights one decode step of one sequence reads from a GGUF model."""

    layers: int  # every blk.* tensor
    lm_head: int  # output.weight, or the token embedding when tied
    other: int  # tensors outside the layers (final norm, rope factors)
    embedding_row: int  # one row of the token embedding (the lookup)
    tied: bool

    @property
    def total(self) -> int:
        return self.layers + self.lm_head + self.other + self.embedding_row

    def describe(self) -> str:
        head = "tied embedding" if self.tied else "output.weight"
        return (f"{self.total / MB:.1f} MB (layers {self.layers / MB:.1f}, LM head "
                f"{self.lm_head / MB:.1f} ({head}), other {self.other / MB:.2f}, "
                f"one embedding row {self.embedding_row} B)")


def decode_bytes(path: Path) -> DecodeBytes:
    """Weight bytes per decoded token of the GGUF file at ``path``."""
    tensors = {info.name: info for info in GGUFFile.read(path).tensors}
    embedding = tensors.get(EMBEDDING)
    if embedding is None:
        raise ValueError(f"{path} has no {EMBEDDING}")
    tied = LM_HEAD not in tensors
    layers = sum(t.nbytes for name, t in tensors.items() if name.startswith("blk."))
    other = sum(t.nbytes for name, t in tensors.items()
                if not name.startswith("blk.") and name not in (EMBEDDING, LM_HEAD))
    head = embedding.nbytes if tied else tensors[LM_HEAD].nbytes
    row = embedding.nbytes // embedding.shape[0]  # shape: [vocab, hidden]
    return DecodeBytes(layers=layers, lm_head=head, other=other, embedding_row=row, tied=tied)


# ----------------------------------------------------------------------------- bandwidth

_C_SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static pthread_barrier_t barrier;
static size_t words_per_thread;
static int passes;
static volatile uint64_t sink;

static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *reader(void *arg) {
    (void)arg;
    uint64_t *buf = malloc(words_per_thread * 8), acc[8] = {0};
    for (size_t i = 0; i < words_per_thread; i++) buf[i] = i;  /* first touch: local pages */
    for (int p = 0; p < passes; p++) {
        pthread_barrier_wait(&barrier);
        for (size_t i = 0; i < words_per_thread; i += 8)
            for (int k = 0; k < 8; k++) acc[k] += buf[i + k];
        pthread_barrier_wait(&barrier);
    }
    sink = acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7];
    free(buf);
    return NULL;
}

int main(int argc, char **argv) {
    int threads = atoi(argv[1]);
    size_t bytes = (size_t)atoll(argv[2]);
    passes = atoi(argv[3]);
    words_per_thread = bytes / 8 / threads / 8 * 8;
    pthread_barrier_init(&barrier, NULL, threads + 1);
    pthread_t *ids = malloc(sizeof(pthread_t) * threads);
    for (int t = 0; t < threads; t++) pthread_create(&ids[t], NULL, reader, NULL);
    double best = 1e30;
    for (int p = 0; p < passes; p++) {
        pthread_barrier_wait(&barrier);
        double start = now();
        pthread_barrier_wait(&barrier);
        double took = now() - start;
        if (took < best) best = took;
    }
    for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
    printf("%.6f\n", (double)words_per_thread * 8 * threads / best / 1e9);
    return 0;
}
"""


@dataclass(frozen=True)
class Bandwidth:
    """A read bandwidth measurement: the best pass, in GB/s (1e9 bytes)."""

    gb_s: float
    threads: int
    buffer_bytes: int
    passes: int
    method: str  # "c" or "numpy"

    def describe(self) -> str:
        return (f"{self.gb_s:.1f} GB/s ({self.method}, {self.threads} threads, "
                f"{self.buffer_bytes / 2**20:.0f} MiB, best of {self.passes})")


def read_bandwidth(threads: int | None = None, buffer_bytes: int = 1 << 30,
                   passes: int = 16) -> Bandwidth:
    """Measure the read bandwidth with the C program, else with numpy."""
    threads = threads or os.cpu_count() or 1
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is not None:
        gb_s = _c_bandwidth(compiler, threads, buffer_bytes, passes)
        if gb_s is not None:
            return Bandwidth(gb_s, threads, buffer_bytes, passes, "c")
    return Bandwidth(_numpy_bandwidth(threads, buffer_bytes, passes), threads, buffer_bytes,
                     passes, "numpy")


def _c_bandwidth(compiler: str, threads: int, buffer_bytes: int, passes: int) -> float | None:
    with tempfile.TemporaryDirectory(prefix="heron-bw-") as folder:
        source, binary = Path(folder) / "bw.c", Path(folder) / "bw"
        source.write_text(_C_SOURCE)
        build = subprocess.run([compiler, "-O3", "-march=native", "-pthread", str(source), "-o",
                                str(binary)], capture_output=True)
        if build.returncode != 0:
            return None
        done = subprocess.run([str(binary), str(threads), str(buffer_bytes), str(passes)],
                              capture_output=True, text=True, check=True)
        return float(done.stdout)


def _numpy_bandwidth(threads: int, buffer_bytes: int, passes: int) -> float:
    parts = [np.arange(buffer_bytes // 8 // threads, dtype=np.int64) for _ in range(threads)]
    best = float("inf")
    for _ in range(passes):
        workers = [threading.Thread(target=part.sum) for part in parts]  # sum drops the GIL
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
    return sum(part.nbytes for part in parts) / best / 1e9
