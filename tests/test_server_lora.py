"""LoRA adapters on a real server (`heron serve --enable-lora --lora-modules ...`), through the
openai client and every generating route: a request whose ``model`` names an adapter gets
exactly what the offline ``LLM`` gives with that adapter; ``/v1/models`` lists each adapter with
the served model as its ``parent`` (Ollama's /api/tags its ``details.parent_model``); bad ``--lora-modules`` stop the start with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
import torch
import transformers

from heron import LLM, SamplingParams
from heron.lora import LoRARequest
from tests.server_utils import REPO_ROOT, RemoteServer
from tests.test_lora import save_adapter
from tests.tiny_models import save_tiny_server_model

MESSAGES = [{"role": "user", "content": "Tell me about adapters, please."}]
MAX_TOKENS = 16  # the Responses API takes no fewer
KEY = "sk-lora"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora-serve")
    path = save_tiny_server_model(root / "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    save_adapter(hf, root / "sql", seed=5)
    save_adapter(hf, root / "chat", seed=6)
    save_adapter(hf, root / "big", seed=7, r=32)
    reference = save_adapter(hf, root / "pickled", seed=8)
    reference.save_pretrained(root / "pickled", safe_serialization=False)
    (root / "pickled" / "adapter_model.safetensors").unlink()
    save_adapter(transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**{**hf.config.to_dict(), "intermediate_size": 64})),
        root / "other", seed=9)
    return root


@pytest.fixture(scope="module")
def server(files: Path) -> Iterator[RemoteServer]:
    chat = json.dumps({"name": "chat", "path": str(files / "chat"), "base_model_name": "tiny"})
    with RemoteServer([str(files / "model"), "--dtype", "float32", "--served-model-name", "tiny",
                       "--enable-lora", "--max-loras", "2", "--allow-runtime-lora",
                       "--lora-modules", f"sql={files / 'sql'}", chat], api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline(files: Path) -> dict[str | None, str]:
    """The offline LLM's greedy chat answer under each adapter and the base model."""
    llm = LLM(str(files / "model"), dtype="float32", enable_lora=True, max_loras=2)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    loras = {"sql": LoRARequest("sql", 1, str(files / "sql")),
             "chat": LoRARequest("chat", 2, str(files / "chat")), None: None}
    return {name: llm.chat(MESSAGES, params, use_tqdm=False, lora_request=lora)[0].outputs[0].text
            for name, lora in loras.items()}


def test_chat_with_an_adapter_is_the_offline_llm(server: RemoteServer, offline) -> None:
    assert len(set(offline.values())) == 3  # two adapters and the base: three answers
    client = server.client()
    for model, name in (("sql", "sql"), ("chat", "chat"), ("tiny", None)):
        out = client.chat.completions.create(model=model, messages=MESSAGES,
                                             max_tokens=MAX_TOKENS, temperature=0)
        assert out.model == model
        assert out.choices[0].message.content == offline[name]


def post(server: RemoteServer, path: str, body: dict) -> dict:
    r = httpx.post(server.url(path), json=body, headers=server.headers(), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_every_generating_route_takes_the_adapter(server: RemoteServer, offline) -> None:
    """Completions (over the chat rendered by /tokenize), Responses, Anthropic messages and
    Ollama's /api/chat: model "sql" gives the offline answer under sql."""
    rendered = post(server, "/tokenize", {"model": "sql", "messages": MESSAGES,
                                          "add_generation_prompt": True})
    completion = post(server, "/v1/completions", {
        "model": "sql", "prompt": rendered["tokens"], "max_tokens": MAX_TOKENS, "temperature": 0})
    responses = post(server, "/v1/responses", {
        "model": "sql", "input": MESSAGES, "max_output_tokens": MAX_TOKENS, "temperature": 0})
    messages = post(server, "/v1/messages", {
        "model": "sql", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0})
    ollama = post(server, "/api/chat", {
        "model": "sql", "messages": MESSAGES, "stream": False,
        "options": {"num_predict": MAX_TOKENS, "temperature": 0}})
    assert completion["model"] == "sql"
    assert completion["choices"][0]["text"] == offline["sql"]
    assert responses["output"][-1]["content"][0]["text"] == offline["sql"]
    assert messages["content"][0]["text"] == offline["sql"]
    assert ollama["message"]["content"] == offline["sql"]


def test_models_lists_adapters_with_their_parent(server: RemoteServer, files: Path) -> None:
    cards = {m.id: m for m in server.client().models.list().data}
    assert list(cards) == ["tiny", "sql", "chat"]
    assert cards["sql"].model_extra["parent"] == "tiny"
    assert cards["sql"].model_extra["root"] == str(files / "sql")
    assert cards["chat"].model_extra["parent"] == "tiny"
    assert cards["tiny"].model_extra["parent"] is None
    card = httpx.get(server.url("/v1/models/sql"), headers=server.headers()).json()
    assert card["parent"] == "tiny"


def test_ollama_lists_adapters_a_client_can_pick(server: RemoteServer, files: Path,
                                                offline) -> None:
    """Ollama's /api/tags, /api/ps and /api/show through the ollama client: each adapter after
    the served model, ``details.parent_model`` the model it adapts, its files in the size, a
    digest of its own; the name as listed serves the adapter on /api/chat."""
    client = ollama.Client(host=server.base_url, headers=server.headers())
    listed = client.list().models
    assert [m.model for m in listed] == ["tiny:latest", "sql:latest", "chat:latest"]
    base, sql, chat = listed
    assert [m.details.parent_model for m in listed] == ["", "tiny:latest", "tiny:latest"]
    adapter_bytes = sum(p.stat().st_size for p in (files / "sql").glob("adapter_*"))
    assert sql.size == base.size + adapter_bytes and adapter_bytes > 0
    assert len({base.digest, sql.digest, chat.digest}) == 3
    assert all(len(m.digest or "") == 64 for m in listed)
    assert sql.details.family == base.details.family == "llama"
    assert [m.model for m in client.ps().models] == [m.model for m in listed]
    shown = client.show("sql:latest")
    assert shown.details.parent_model == "tiny:latest"
    assert shown.modelfile is not None and f"ADAPTER {files / 'sql'}\n" in shown.modelfile
    assert client.show("tiny").details.parent_model == ""
    answer = client.chat(model=sql.model, messages=MESSAGES,
                         options={"num_predict": MAX_TOKENS, "temperature": 0})
    assert answer.message.content == offline["sql"]


def test_unknown_model_is_still_404(server: RemoteServer) -> None:
    r = httpx.post(server.url("/v1/chat/completions"), headers=server.headers(),
                   json={"model": "nope", "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["message"] == ("The model `nope` does not exist; this server serves tiny, sql, "
                                "chat.")


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "heron.cli", "serve", *args, "--port", "1"],
                          capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


@pytest.mark.parametrize(("module", "flags", "message"), [
    ("missing", [], "heron: error: LoRA adapter 'x' ({root}/missing): no such directory"),
    ("big", [], "heron: error: LoRA adapter 'x' ({root}/big): rank r=32 exceeds "
                "max_lora_rank=16 (raise --max-lora-rank)"),
    ("sql", ["--max-lora-rank", "4"], "heron: error: LoRA adapter 'x' ({root}/sql): rank r=8 "
                                      "exceeds max_lora_rank=4"),
    ("pickled", [], "heron: error: LoRA adapter 'x' ({root}/pickled): adapter_model.bin is a "
                    "pickle, which heron does not load"),
])
def test_bad_lora_modules_stop_the_start(files: Path, module: str, flags: list[str],
                                         message: str) -> None:
    """Refused before the model loads: exit status 2 and the adapter named."""
    proc = _serve(str(files / "model"), "--enable-lora", "--lora-modules",
                  f"x={files / module}", *flags)
    assert proc.returncode == 2, proc.stderr
    assert message.format(root=files) in proc.stderr
    assert "engine core process started" not in proc.stderr


def test_lora_modules_need_enable_lora(files: Path) -> None:
    proc = _serve(str(files / "model"), "--lora-modules", f"x={files / 'sql'}")
    assert proc.returncode == 2
    assert ("heron: error: LoRA modules were given but LoRA is not enabled (--enable-lora)"
            in proc.stderr)


def test_adapter_of_another_model_stops_the_engine(files: Path) -> None:
    """Shapes are checked against the loaded model: the engine does not start, exit status 1."""
    proc = _serve(str(files / "model"), "--dtype", "float32", "--enable-lora",
                  "--lora-modules", f"x={files / 'other'}")
    assert proc.returncode == 1, proc.stderr
    assert (f"LoRA adapter 'x' ({files}/other): base_model.model.model.layers.0.mlp.down_proj."
            "lora_A.weight has shape (8, 64), the base model expects (8, 128)") in proc.stderr


def test_adapters_load_and_unload_at_run_time(server: RemoteServer, files: Path, offline) -> None:
    """--allow-runtime-lora: vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, behind
    the API key; a loaded name serves at once, an unloaded one is a 404 again."""
    load, unload = server.url("/v1/load_lora_adapter"), server.url("/v1/unload_lora_adapter")
    body = {"lora_name": "live", "lora_path": str(files / "chat")}
    assert httpx.post(load, json=body).status_code == 401
    r = httpx.post(load, json=body, headers=server.headers())
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'live' added successfully.")
    cards = {m.id: m for m in server.client().models.list().data}
    assert cards["live"].model_extra["parent"] == "tiny"
    out = server.client().chat.completions.create(model="live", messages=MESSAGES,
                                                  max_tokens=MAX_TOKENS, temperature=0)
    assert out.choices[0].message.content == offline["chat"]
    again = httpx.post(load, json=body, headers=server.headers())
    assert again.status_code == 400
    assert again.json()["error"]["message"] == "The lora adapter 'live' has already been loaded."
    bad = httpx.post(load, json={"lora_name": "big", "lora_path": str(files / "big")},
                     headers=server.headers())
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == (
        f"LoRA adapter 'big' ({files}/big): rank r=32 exceeds max_lora_rank=16 "
        "(raise --max-lora-rank)")
    other = {"lora_name": "other", "lora_path": str(files / "other")}  # fits another model
    assert httpx.post(load, json=other, headers=server.headers()).status_code == 200
    misfit = httpx.post(server.url("/v1/chat/completions"), headers=server.headers(),
                        json={"model": "other", "messages": MESSAGES, "max_tokens": 2})
    assert misfit.status_code == 400
    assert "lora_A.weight has shape (8, 64), the base model expects (8, 128)" in misfit.text
    r = httpx.post(unload, json={"lora_name": "live"}, headers=server.headers())
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'live' removed successfully.")
    gone = httpx.post(server.url("/v1/chat/completions"), headers=server.headers(),
                      json={"model": "live", "messages": MESSAGES, "max_tokens": 2})
    assert gone.status_code == 404
    missing = httpx.post(unload, json={"lora_name": "live"}, headers=server.headers())
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "The lora adapter 'live' cannot be found."


def test_runtime_lora_routes_need_the_flag() -> None:
    from fastapi.testclient import TestClient

    from heron.server.app import build_app
    from heron.server.config import ServerConfig

    client = TestClient(build_app(ServerConfig()), base_url="http://127.0.0.1:8000")
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
    assert r.status_code == 404
    proc = _serve("--allow-runtime-lora")
    assert proc.returncode == 2
    assert "heron: error: --allow-runtime-lora needs --enable-lora" in proc.stderr
