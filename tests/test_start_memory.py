"""Memory of a first start (empty cache) of ``heron serve`` on a GGUF file: the API process
builds the tokenizer while the engine loads the model, and takes the model's config from the
snapshot the engine writes, so it never imports torch (which kept ~200 MiB resident in it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from heron.bench import procmem
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


def test_first_start_api_process_stays_light(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with RemoteServer([str(tiny_gguf), "--max-model-len", "128"],
                      env={"HERON_CACHE_DIR": str(cache)}) as server:
        answer = server.client().completions.create(model=server.client().models.list().data[0].id,
                                                    prompt="w1 w2", max_tokens=2, temperature=0)
        assert answer.usage is not None and answer.usage.completion_tokens == 2
        api_pid, engine_pid = server.proc.pid, server.engine_pid()
        assert _maps_torch(engine_pid)  # the check itself sees torch where it is loaded
        assert not _maps_torch(api_pid)
        rss = procmem.rss_bytes(api_pid)
        assert 0 < rss < API_RSS_BOUND, f"API process resident {rss / 2**20:.0f} MiB"
        # the config the API process read is the engine's snapshot, written on this start
        assert list(cache.rglob("plain_config.json"))
