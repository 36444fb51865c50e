"""The prepared-weights cache: a cached load is the uncached load, bit for bit."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from heron import LLM, SamplingParams
from heron.config import ModelConfig
from heron.loader import prepared as prepared_module
from heron.loader import resolve_source
from heron.loader.plain_config import PlainConfig
from heron.loader.prepared import (
    load_prepared_model,
    prepared_path,
    weight_recipe,
)
from tests.test_loader import tiny_gguf  # noqa: F401  (a pytest fixture)

CPU = torch.device("cpu")
PROMPTS = [{"prompt_token_ids": [1, 270, 271, 272, 280]}, {"prompt_token_ids": [1, 300, 290]}]


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "heron-cache"
    monkeypatch.setenv("HERON_CACHE_DIR", str(root))
    return root


def _load(path: Path, dtype: torch.dtype = torch.float32, quantization: str = "int8") -> tuple[nn.Module, int]:
    loaded, added = load_prepared_model(ModelConfig(model=str(path)), CPU, dtype, quantization)
    return loaded.model, added


def _file(path: Path, dtype: torch.dtype = torch.float32, quantization: str = "int8") -> Path:
    return prepared_path(resolve_source(str(path)), weight_recipe(dtype, CPU, quantization))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a forward pass reads: parameters and the quantized copies' fields."""
    state = {name: p.data for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        quantized = getattr(module, "quantized", None)
        if quantized is not None:
            fields = {f.name: getattr(quantized, f.name) for f in dataclasses.fields(quantized)}
            state |= {f"{name}.quantized.{k}": v for k, v in fields.items()}
            state[f"{name}.quantized.type"] = type(quantized).__name__
    return state


def _assert_same(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[name].dtype == value.dtype, name
            assert torch.equal(actual[name], value), name
        else:
            assert actual[name] == value, name


@pytest.mark.parametrize(("dtype", "quantization"), [(torch.float32, "int8"), (torch.bfloat16, "int8"),
                                                     (torch.bfloat16, "int4"),
                                                     (torch.float32, "none")])
def test_cached_load_equals_uncached(tiny_gguf: tuple[Path, object], cache_dir: Path,  # noqa: F811
                                     dtype: torch.dtype, quantization: str) -> None:
    path, _ = tiny_gguf
    fresh, fresh_bytes = _load(path, dtype, quantization)
    assert _file(path, dtype, quantization).is_file()
    cached, cached_bytes = _load(path, dtype, quantization)
    assert cached_bytes == fresh_bytes
    _assert_same(_state(fresh), _state(cached))
    if quantization != "none":
        assert any(getattr(m, "quantized", None) is not None for m in cached.modules())


def test_cached_engine_gives_the_same_tokens_and_logprobs(tiny_gguf: tuple[Path, object],  # noqa: F811
                                                         cache_dir: Path) -> None:
    path, _ = tiny_gguf
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)

    def run() -> list[tuple[list[int], list]]:
        llm = LLM(str(path), dtype="bfloat16", quantization="int8",
                  skip_tokenizer_init=True)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    fresh = run()
    assert _file(path, torch.bfloat16, "int8").is_file()
    assert run() == fresh


def test_cached_load_reads_no_gguf_tensor(tiny_gguf: tuple[Path, object], cache_dir: Path,  # noqa: F811
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = tiny_gguf
    _load(path)

    def no_gguf(*args: object, **kwargs: object) -> None:
        raise AssertionError("the GGUF weights were read")

    monkeypatch.setattr(prepared_module, "load_model", no_gguf)
    _load(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_file_falls_back_and_is_rewritten(tiny_gguf: tuple[Path, object], cache_dir: Path,  # noqa: F811
                                                  caplog: pytest.LogCaptureFixture,
                                                  damage: str) -> None:
    path, _ = tiny_gguf
    expected = _state(_load(path)[0])
    file = _file(path)
    data = file.read_bytes()
    file.write_bytes({"truncate": data[:len(data) // 2], "garbage": b"\x00not safetensors" * 64,
                      "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="heron.loader.prepared"):
        _assert_same(expected, _state(_load(path)[0]))
    assert "not usable" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="heron.loader.prepared"):  # rewritten: used again
        _assert_same(expected, _state(_load(path)[0]))
    assert not caplog.text and len(file.read_bytes()) == len(data)


def test_file_of_another_model_shape_falls_back(tiny_gguf: tuple[Path, object], cache_dir: Path,  # noqa: F811
                                                caplog: pytest.LogCaptureFixture) -> None:
    path, _ = tiny_gguf
    expected = _state(_load(path)[0])
    file = _file(path)
    tensors = load_file(str(file))
    name = next(n for n in tensors if n.endswith("norm.weight"))
    tensors[name] = torch.zeros(3)
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(file), metadata=metadata)
    with caplog.at_level(logging.WARNING, logger="heron.loader.prepared"):
        _assert_same(expected, _state(_load(path)[0]))
    assert "shape" in caplog.text


def test_key_changes_with_every_input(tiny_gguf: tuple[Path, object], cache_dir: Path,  # noqa: F811
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = tiny_gguf
    base = weight_recipe(torch.bfloat16, CPU, "int8")
    variants = [weight_recipe(torch.float32, CPU, "int8"), weight_recipe(torch.bfloat16, CPU, "int4"),
                weight_recipe(torch.bfloat16, CPU, "none"),
                dataclasses.replace(base, keep_float32=not base.keep_float32),
                dataclasses.replace(base, q8_kernel=not base.q8_kernel),
                dataclasses.replace(base, amx=not base.amx),
                dataclasses.replace(base, cpu_isa="avx2"), dataclasses.replace(base, torch_isa="AVX2"),
                dataclasses.replace(base, torch_version="0.0"), dataclasses.replace(base, code="x")]
    keys = {base.key()} | {v.key() for v in variants}
    assert len(keys) == len(variants) + 1
    assert weight_recipe(torch.bfloat16, CPU, "int8").key() == base.key()  # and it is stable
    monkeypatch.setattr(prepared_module, "_PRODUCERS", prepared_module._PRODUCERS[:-1])
    assert weight_recipe(torch.bfloat16, CPU, "int8").key() != base.key()  # the code is hashed


def test_recipe_recorded_in_the_file_must_match(tiny_gguf: tuple[Path, object], cache_dir: Path,  # noqa: F811
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    path, _ = tiny_gguf
    _load(path, torch.float32, "int8")
    int4 = _file(path, torch.float32, "int4")
    int4.write_bytes(_file(path, torch.float32, "int8").read_bytes())  # a file under a wrong name
    with caplog.at_level(logging.WARNING, logger="heron.loader.prepared"):
        model, _ = _load(path, torch.float32, "int4")
    assert "another recipe" in caplog.text
    assert all(type(m.quantized).__name__ == "PackedWeight"
               for m in model.modules() if getattr(m, "quantized", None) is not None)


def test_old_files_are_removed(tiny_gguf: tuple[Path, object], cache_dir: Path,  # noqa: F811
                               monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = tiny_gguf
    monkeypatch.setattr(prepared_module, "_KEEP_FILES", 2)
    for quantization in ("none", "int8", "int4"):
        _load(path, torch.float32, quantization)
    assert not _file(path, torch.float32, "none").exists()
    assert _file(path, torch.float32, "int8").exists() and _file(path, torch.float32, "int4").exists()


def test_cached_load_builds_the_model_from_a_plain_config(tiny_gguf: tuple[Path, object],  # noqa: F811
                                                          cache_dir: Path) -> None:
    path, _ = tiny_gguf
    fresh, _ = load_prepared_model(ModelConfig(model=str(path)), CPU, torch.float32, "int8")
    cached, _ = load_prepared_model(ModelConfig(model=str(path)), CPU, torch.float32, "int8")
    assert isinstance(cached.hf_config, PlainConfig)
    assert cached.hf_config.get_text_config() is cached.hf_config
    for name, value in fresh.hf_config.to_dict().items():
        assert json.dumps(getattr(cached.hf_config, name)) == json.dumps(value), name
    assert cached.generation_config == fresh.generation_config


def test_cached_start_never_imports_transformers(tiny_gguf: tuple[Path, object],  # noqa: F811
                                                 cache_dir: Path) -> None:
    path, _ = tiny_gguf
    _load(path, torch.bfloat16)
    script = ("import sys, torch; from heron.config import ModelConfig; "
              "from heron.loader.prepared import load_prepared_model; "
              f"load_prepared_model(ModelConfig(model={str(path)!r}), torch.device('cpu'), "
              "torch.bfloat16, 'int8'); print(sorted(m for m in sys.modules if m.startswith('transformers')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "HERON_CACHE_DIR": str(cache_dir)})
    assert done.stdout.strip() == "[]", done.stderr[-2000:]


def test_a_file_of_another_kernel_variant_is_never_read_and_is_rewritten(
        tiny_gguf: tuple[Path, object], cache_dir: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = tiny_gguf
    monkeypatch.setenv("HERON_CPU_ISA", "avx512")
    _load(path, torch.bfloat16, "int4")
    written = _file(path, torch.bfloat16, "int4")
    assert written.is_file() and weight_recipe(torch.bfloat16, CPU, "int4").cpu_isa == "avx512"
    reads: list[Path] = []
    real = prepared_module._load_cached
    monkeypatch.setattr(prepared_module, "_load_cached",
                        lambda source, file, *a: reads.append(file) or real(source, file, *a))
    for variant in ("avx2", "portable"):
        monkeypatch.setenv("HERON_CPU_ISA", variant)
        own = _file(path, torch.bfloat16, "int4")
        assert own != written
        _load(path, torch.bfloat16, "int4")  # not read: built and written under its own key
        assert reads == [] and own.is_file()
        _load(path, torch.bfloat16, "int4")  # its own file is read from then on
        assert reads == [own]
        reads.clear()


@pytest.mark.cpu_features("avx512f", "avx512bw", "avx512vl", "avx512dq")
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="needs a CPU where PyTorch runs its AVX-512 kernels, to compare with AVX2")
def test_int4_packed_under_another_torch_isa_is_never_read(tiny_gguf: tuple[Path, object],  # noqa: F811
                                                          cache_dir: Path) -> None:
    """PyTorch packs int4 codes differently per instruction set: a file written under AVX-512
    and read under ``ATEN_CPU_CAPABILITY=avx2`` would give wrong outputs without a warning."""
    path, _ = tiny_gguf
    _load(path, torch.bfloat16, "int4")
    written = _file(path, torch.bfloat16, "int4")
    script = ("import json, torch; from heron.config import ModelConfig; "
              "from heron.loader import prepared as p, resolve_source; "
              "reads = []; real = p._load_cached; "
              "p._load_cached = lambda s, f, *a: reads.append(str(f)) or real(s, f, *a); "
              f"args = (ModelConfig(model={str(path)!r}), torch.device('cpu'), torch.bfloat16, 'int4'); "
              "p.load_prepared_model(*args); "
              "recipe = p.weight_recipe(torch.bfloat16, torch.device('cpu'), 'int4'); "
              "own = str(p.prepared_path(resolve_source(args[0].model), recipe)); "
              "print(json.dumps({'isa': recipe.torch_isa, 'reads': reads, 'own': own}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "HERON_CACHE_DIR": str(cache_dir),
                               "ATEN_CPU_CAPABILITY": "avx2"})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["isa"] == "AVX2" and result["own"] != str(written)
    assert result["reads"] == [] and Path(result["own"]).is_file() and written.is_file()
