"""The portable kernels on ARM64: gguf_matmul.c cross-compiled with Debian's aarch64 compiler
(the portable variant's flags: none, so the compiler vectorizes for its own target, NEON) and
run under ``qemu-aarch64`` on every block format, in both modes, against the ``gguf``
library's dequantization with the bounds of the x86 tests (tests/test_gguf_kernels.py).

Needs ``apt-get install gcc-aarch64-linux-gnu qemu-user`` (``.ci/run`` does). Without them
these tests skip, except under ``CI=true``, where they fail: CI must run them.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from heron.kernels.cpu import isa
from heron.kernels.cpu.gguf import BLOCK_FORMATS
from tests.test_gguf_kernels import _activations, _check, dequantized, random_blocks

SOURCES = Path(isa.__file__).parent
DRIVER = Path(__file__).parent / "arm64" / "gguf_driver.c"
CROSS_CC, QEMU, SYSROOT = "aarch64-linux-gnu-gcc", "qemu-aarch64", "/usr/aarch64-linux-gnu"
BATCHES = (1, 7, 16, 33)
EM_AARCH64 = 183  # the ELF header's e_machine of an ARM64 binary


def _tools_or_skip() -> None:
    missing = [tool for tool in (CROSS_CC, QEMU) if shutil.which(tool) is None]
    if not missing:
        return
    reason = f"{' and '.join(missing)} not installed (apt-get install gcc-aarch64-linux-gnu qemu-user)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; under CI=true the ARM64 check must run (.ci/run installs them)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _tools_or_skip()
    binary = tmp_path_factory.mktemp("arm64") / "gguf_driver"
    command = [CROSS_CC, "-O3", *isa.SPECS["portable"].flags, "-fopenmp", f"-I{SOURCES}",
               str(DRIVER), str(SOURCES / "gguf_matmul.c"), "-o", str(binary), "-lm"]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    header = binary.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and struct.unpack("<H", header[18:20])[0] == EM_AARCH64
    return binary


def _run(driver: Path, cases: list[tuple[str, np.ndarray, torch.Tensor, bool]],
         tmp_path: Path) -> list[torch.Tensor]:
    """Each case (format, blocks [N, row bytes], x [M, K], exact) through the ARM64 binary."""
    request, reply = tmp_path / "cases.bin", tmp_path / "out.bin"
    with open(request, "wb") as f:
        f.write(struct.pack("<q", len(cases)))
        for fmt, blocks, x, exact in cases:
            (m, k), (n, row_bytes) = x.shape, blocks.shape
            f.write(struct.pack("<6q", m, k, n, BLOCK_FORMATS[fmt][0], row_bytes, int(exact)))
            f.write(np.ascontiguousarray(blocks).tobytes())
            f.write(x.contiguous().numpy().astype("<f4").tobytes())
    env = dict(os.environ, QEMU_LD_PREFIX=SYSROOT, OMP_NUM_THREADS="2")
    subprocess.run([QEMU, str(driver), str(request), str(reply)], check=True, env=env,
                   timeout=600)
    data, offset, outs = reply.read_bytes(), 0, []
    for _, blocks, x, _ in cases:
        size = 4 * x.shape[0] * blocks.shape[0]
        out = np.frombuffer(data, dtype="<f4", count=size // 4, offset=offset)
        outs.append(torch.from_numpy(out.copy()).view(x.shape[0], blocks.shape[0]))
        offset += size
    assert offset == len(data)
    return outs


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "int8"])
def test_portable_matmul_on_arm64_equals_the_dequantized_weight(driver: Path, tmp_path: Path,
                                                                exact: bool) -> None:
    cases, weights = [], []
    for i, fmt in enumerate(BLOCK_FORMATS):
        elems = BLOCK_FORMATS[fmt][1]
        k = 3 * elems if elems == 32 else 2 * elems
        blocks = random_blocks(fmt, rows=37, k=k, seed=10 + i)
        for m in BATCHES:
            cases.append((fmt, blocks, _activations(m, k, seed=m), exact))
            weights.append(dequantized(fmt, blocks))
    for (_, _, x, _), w, out in zip(cases, weights, _run(driver, cases, tmp_path)):
        _check(out, x, w, exact)


def test_every_kernel_source_builds_for_arm64(tmp_path: Path) -> None:
    """All the C kernels (not only the one run above) compile for ARM64 as the portable variant."""
    _tools_or_skip()
    sources = sorted(str(p) for p in SOURCES.glob("*.c") if p.name != "probe.c")
    assert len(sources) >= 5  # elementwise, fused_decode, gguf_matmul, paged_attention, q8_gemm
    library = tmp_path / "kernels.so"
    subprocess.run([CROSS_CC, "-O3", *isa.SPECS["portable"].flags, "-fopenmp", "-shared", "-fPIC",
                    *sources, "-o", str(library), "-lm"], check=True, timeout=600)
    assert struct.unpack("<H", library.read_bytes()[18:20])[0] == EM_AARCH64
