"""Memory of a first start (empty cache) of ``heron serve`` on a GGUF file: the API process
builds the tokenizer while the engine loads the model, and takes the model's config from the
snapshot the engine writes, so it never imports torch (which kept ~200 MiB resident in it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from heron.bench import procmem
from heron.server.launch import API_ARENAS
from tests.gguf_files import synthetic_vocab, write_gguf
from tests.model_harness import make_hf_model
from tests.server_utils import RemoteServer

# Measured on the tiny model below: 99 MiB with this layout; 283 MiB when the API process built
# the config itself (torch imported). The bound sits between, with room for other allocators.
API_RSS_BOUND = 180 * 2**20


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=2, head_dim=32,
                                      max_position_embeddings=256, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("start-memory") / "model.gguf"
    return write_gguf(path, make_hf_model(config, seed=3), synthetic_vocab(320))


def _maps_torch(pid: int) -> bool:
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


def _thread_arenas(pid: int) -> int:
    """glibc's malloc arenas besides the main one. Each heap of an arena reserves 64 MiB at a
    64 MiB-aligned address, a read-write part followed by an inaccessible rest, and starts with
    its heap_info (the arena's pointer, then the previous heap's): an arena that outgrows its
    first heap adds another whose previous-heap pointer is set; only first heaps are counted,
    known by their arena, which lies just after the heap_info. Other 64 MiB mappings can sit at
    such an address too (one seen in 1 of 12 runs: all rw, never touched, zeros)."""
    size = 64 << 20
    maps = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        maps.append((low, high, fields[1], len(fields) > 5))  # named: a file or [heap] etc.
    heaps = []
    for i, (low, high, perms, named) in enumerate(maps):
        if low % size or named or not perms.startswith("rw"):
            continue
        end = high
        for low_next, high_next, perms_next, named_next in maps[i + 1:]:
            if low_next != end or named_next or not perms_next.startswith("---"):
                break
            end = high_next
        if end - low == size:
            heaps.append(low)
    with open(f"/proc/{pid}/mem", "rb") as memory:  # the server is this test's child
        def first_heap(start: int) -> bool:
            memory.seek(start)
            info = memory.read(16)
            arena, previous = (int.from_bytes(info[i:i + 8], "little") for i in (0, 8))
            return start < arena < start + 4096 and previous == 0
        return sum(first_heap(start) for start in heaps)


def test_first_start_api_process_stays_light(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with RemoteServer([str(tiny_gguf), "--max-model-len", "128"],
                      env={"HERON_CACHE_DIR": str(cache)}) as server:
        answer = server.client().completions.create(model=server.client().models.list().data[0].id,
                                                    prompt="w1 w2", max_tokens=2, temperature=0)
        assert answer.usage is not None and answer.usage.completion_tokens == 2
        api_pid, engine_pid = server.proc.pid, server.engine_pid()
        # two processes: multiprocessing's resource tracker (13 MiB) is not started any more
        assert {pid: procmem.process_label(pid, api_pid) for pid in procmem.tree_pids(api_pid)
                } == {api_pid: "server", engine_pid: "engine core"}
        assert _maps_torch(engine_pid)  # the check itself sees torch where it is loaded
        assert not _maps_torch(api_pid)
        # the tokenizer's thread shares one arena with the others (heron.heap.limit_arenas):
        # 6 of them on the default model without the limit, ~30 MiB more resident
        assert _thread_arenas(api_pid) == API_ARENAS - 1
        assert _thread_arenas(engine_pid) > 0  # the check itself sees arenas where they are
        rss = procmem.rss_bytes(api_pid)
        assert 0 < rss < API_RSS_BOUND, f"API process resident {rss / 2**20:.0f} MiB"
        # the config the API process read is the engine's snapshot, written on this start
        assert list(cache.rglob("plain_config.json"))
