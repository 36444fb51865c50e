"""``heron bench peers``' measurements: weight bytes per decoded token from a GGUF file, the read
bandwidth, and the resident memory of a process tree sampled from /proc."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np

from heron.bench import procmem, roofline
from heron.loader.default_model import default_gguf_path

HIDDEN, VOCAB = 64, 4
Q8_ROW = HIDDEN // 32 * 34  # two Q8_0 blocks of 32 values: f16 scale + 32 int8


def _write_tiny_gguf(path: Path, tied: bool) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    embedding = rng.integers(0, 255, size=(VOCAB, Q8_ROW), dtype=np.uint8)
    writer.add_tensor("token_embd.weight", embedding, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", rng.random((HIDDEN, HIDDEN), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((VOCAB, HIDDEN), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tied_head_reads_the_whole_embedding_and_the_lookup_one_row(tmp_path: Path) -> None:
    counted = roofline.decode_bytes(_write_tiny_gguf(tmp_path / "tied.gguf", tied=True))
    assert counted.tied
    assert counted.layers == HIDDEN * HIDDEN * 4 + HIDDEN * 4  # f32 q projection + f32 norm
    assert counted.lm_head == VOCAB * Q8_ROW
    assert counted.other == HIDDEN * 4
    assert counted.embedding_row == Q8_ROW
    assert counted.total == 16384 + 256 + 4 * 68 + 256 + 68


def test_untied_head_is_output_weight_and_the_embedding_one_row(tmp_path: Path) -> None:
    counted = roofline.decode_bytes(_write_tiny_gguf(tmp_path / "untied.gguf", tied=False))
    assert not counted.tied
    assert counted.lm_head == VOCAB * HIDDEN * 2  # f16
    assert counted.embedding_row == Q8_ROW
    assert counted.total == 16384 + 256 + 512 + 256 + 68


def test_default_model_bytes_per_token() -> None:
    counted = roofline.decode_bytes(default_gguf_path())
    # the file's tensors total 246,587,904 bytes: Q8_0 embedding 262,144 x 640 (178,257,920
    # bytes, 680 a row), 18 layers of Q5_0/Q8_0/Q4_K/Q6_K, f32 norms; the final norm 2,560
    assert counted.tied and counted.lm_head == 178_257_920 and counted.embedding_row == 680
    assert counted.other == 2_560
    assert counted.layers == 246_587_904 - 178_257_920 - 2_560
    assert counted.total == 246_587_904 + 680
    assert counted.describe().startswith("246.6 MB (layers 68.3, LM head 178.3 (tied embedding)")


def test_read_bandwidth_runs_the_c_program_where_there_is_a_compiler() -> None:
    measured = roofline.read_bandwidth(threads=2, buffer_bytes=64 * 2**20, passes=2)
    assert measured.method == ("c" if shutil.which("cc") or shutil.which("gcc") else "numpy")
    assert 0.1 < measured.gb_s < 10_000 and measured.threads == 2
    assert 0.1 < roofline._numpy_bandwidth(2, 32 * 2**20, 2) < 10_000


_GRANDCHILD = ("import time; b = b'x' * (96 << 20); print('allocated', flush=True); "
               "time.sleep(0.6); del b; print('freed', flush=True); time.sleep(30)")
_CHILD = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1]]); "
          "p.wait()")


def test_peak_sampler_sums_the_tree_and_keeps_a_transient_peak() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _CHILD, _GRANDCHILD], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        with procmem.PeakSampler(parent.pid, interval_s=0.05) as sampler:
            assert parent.stdout is not None and parent.stdout.readline() == "allocated\n"
            pids = procmem.tree_pids(parent.pid)
            assert pids[0] == parent.pid and len(pids) == 2
            during = procmem.tree_memory(parent.pid)
            assert during.processes == 2 and during.rss >= 96 * 2**20
            assert during.rss >= procmem.rss_bytes(pids[1]) >= 96 * 2**20
            assert 0 < during.pss <= during.rss
            assert parent.stdout.readline() == "freed\n"
            time.sleep(0.1)
        after = procmem.tree_rss(parent.pid)
        assert sampler.peak >= 96 * 2**20 and sampler.samples >= 5
        assert after < sampler.peak - 64 * 2**20  # the peak outlives the memory
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(10)
    assert procmem.rss_bytes(parent.pid) == 0 and procmem.tree_memory(parent.pid).processes == 1


def test_folder_bytes_counts_files_below(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"1" * 1000)
    (tmp_path / "y.bin").write_bytes(b"2" * 24)
    assert procmem.folder_bytes(tmp_path) == 1024
    assert procmem.folder_bytes(tmp_path / "missing") == 0
    assert procmem.largest_files(tmp_path, 5) == [("a/x.bin", 1000), ("y.bin", 24)]
    assert procmem.largest_files(tmp_path, 1) == [("a/x.bin", 1000)]
