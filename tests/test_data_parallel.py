"""End to end: `heron serve MODEL --data-parallel-size 2` (mp backend) with a tiny random Llama.

Two engine core processes behind one endpoint: greedy outputs equal one engine's, both engines
serve, a shared prefix stays on one engine (its prefix cache hits prove it), and a killed engine
fails only its own requests while the other keeps serving. The offline ``LLM`` with
``data_parallel_size=2`` gives one engine's outputs too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from heron import LLM, SamplingParams
from tests.dp_utils import (
    PROMPTS,
    complete,
    engine_metric,
    kill_engine_during_two_streams,
    settled,
)
from tests.server_utils import RemoteServer
from tests.tiny_models import save_tiny_server_model

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
BLOCK = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_server_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[RemoteServer]:
    args = [str(model_dir), "--kv-cache-memory", "16MiB", "--data-parallel-size", "2"]
    with RemoteServer(args) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> list[tuple[list[int], str]]:
    """Greedy (token ids, text) of PROMPTS from one engine (the offline LLM, in process)."""
    llm = LLM(str(model_dir), kv_cache_memory=16 << 20)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [(r.outputs[0].token_ids, r.outputs[0].text) for r in outputs]


def test_greedy_outputs_equal_one_engine(
    server: RemoteServer, reference: list[tuple[list[int], str]], model_dir: Path
) -> None:
    texts = [complete(server, p)["choices"][0]["text"] for p in PROMPTS]
    assert texts == [text for _, text in reference]
    chunks = server.client().completions.create(  # streaming goes through the router unchanged
        model=str(model_dir), prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in chunks) == texts[1]


def test_n_choices_stay_on_one_engine(server: RemoteServer) -> None:
    before = engine_metric(server, "heron:prompt_tokens_total")
    complete(server, [(i * 13) % 400 + 100 for i in range(40)], n=4, temperature=1.0, seed=1)
    after = settled(server, "heron:prompt_tokens_total", before[""] + 4 * 40)
    new = sorted(after[e] - before[e] for e in ("0", "1"))
    assert new == [0, 4 * 40]


def test_both_engines_served_work(server: RemoteServer) -> None:
    tokens = engine_metric(server, "heron:generation_tokens_total")
    assert tokens["0"] > 0 and tokens["1"] > 0, tokens
    assert tokens[""] == tokens["0"] + tokens["1"]
    up = engine_metric(server, "heron:engine_up")
    assert up == {"0": 1.0, "1": 1.0}
    health = httpx.get(server.url("/health"))
    assert health.status_code == 200
    assert health.json()["status"] == "ok"


def test_shared_prefix_lands_on_one_engine(server: RemoteServer) -> None:
    prefix = [(i * 37 + 11) % 400 + 100 for i in range(512)]  # token ids no other test uses
    before_hits = engine_metric(server, "heron:prefix_cache_hits_total")
    before_queries = engine_metric(server, "heron:prefix_cache_queries_total")
    for i in range(8):
        complete(server, prefix + [4 + i, 50, 60], max_tokens=2)
    want_queries = before_queries[""] + 8 * (512 + 3)
    queries = settled(server, "heron:prefix_cache_queries_total", want_queries)
    hits = engine_metric(server, "heron:prefix_cache_hits_total")
    new_queries = {e: queries[e] - before_queries[e] for e in ("0", "1")}
    new_hits = {e: hits[e] - before_hits[e] for e in ("0", "1")}
    home = max(new_queries, key=new_queries.get)
    other = "1" if home == "0" else "0"
    assert new_queries == {home: 8 * 515, other: 0}
    assert new_hits == {home: 7 * (512 // BLOCK) * BLOCK, other: 0}


def test_chat_and_aborts_through_the_router(server: RemoteServer, model_dir: Path) -> None:
    chat = server.client().chat.completions.create(
        model=str(model_dir), messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, n=2,
    )
    first, second = (c.message.content for c in chat.choices)
    assert first == second  # greedy, on one engine
    body = {"prompt": "q", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    # the client left: its engine aborts the sequence and frees its blocks
    flight = settled(server, "heron:num_sequences_in_flight", 0.0)
    assert flight == {"": 0.0, "0": 0.0, "1": 0.0}
    running = settled(server, "heron:num_requests_running", 0.0)
    assert running == {"": 0.0, "0": 0.0, "1": 0.0}


def test_structured_output_on_both_engines(server: RemoteServer, model_dir: Path) -> None:
    """A JSON schema through the router: each engine compiles it and constrains its tokens (the
    tiny random model writes anything it is allowed to)."""
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "n": {"type": "integer"}},
              "required": ["answer", "n"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    before = engine_metric(server, "heron:generation_tokens_total")
    for i in range(4):  # no shared first block (the template adds 6 tokens): engines take turns
        chat = server.client().chat.completions.create(
            model=str(model_dir), messages=[{"role": "user", "content": f"{i} question"}],
            max_tokens=60, temperature=0, response_format=response_format)
        choice = chat.choices[0]
        assert choice.finish_reason == "stop", choice
        reply = json.loads(choice.message.content)
        assert set(reply) == {"answer", "n"} and reply["answer"] in ("yes", "no")
        assert isinstance(reply["n"], int)
    after = engine_metric(server, "heron:generation_tokens_total")
    assert after["0"] > before["0"] and after["1"] > before["1"], (before, after)


def test_offline_llm_spreads_over_two_engines(
    model_dir: Path, reference: list[tuple[list[int], str]]
) -> None:
    llm = LLM(str(model_dir), kv_cache_memory=16 << 20, data_parallel_size=2)
    try:
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [(r.outputs[0].token_ids, r.outputs[0].text) for r in outputs] == reference
        want = len(PROMPTS) * GREEDY.max_tokens
        deadline = time.monotonic() + 10  # an engine sends its stats once it is idle
        while llm.engine.stats().generation_tokens_total < want and time.monotonic() < deadline:
            time.sleep(0.1)
        served = [s.generation_tokens_total for s in llm.engine.engine_stats()]
        assert sum(served) == want
        assert min(served) > 0, served
    finally:
        llm.close()


def test_killed_engine_leaves_the_server_serving(server: RemoteServer) -> None:
    """Last in the module: it kills engine 0."""
    error, survivor, _ = kill_engine_during_two_streams(server, 0)
    assert error["code"] == "engine_unavailable"
    assert "engine core 0 exited (exit code -9)" in error["message"], error
    assert survivor.count('"text"') == 1000 and survivor.endswith("data: [DONE]")

    health = httpx.get(server.url("/health"))
    assert health.status_code == 200
    assert health.json()["status"] == "degraded"
    assert [e["up"] for e in health.json()["engines"]] == [False, True]
    for p in PROMPTS[:4]:  # new requests go to engine 1
        assert complete(server, p)["choices"][0]["finish_reason"] == "length"
    assert engine_metric(server, "heron:engine_up") == {"0": 0.0, "1": 1.0}
