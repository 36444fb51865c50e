"""`heron bench serve`: the metric arithmetic on scripted records, the streaming client against a
scripted fake SSE server (known delays, usage, failures), prompt building, and the CLI."""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from heron.bench import serve
from heron.bench.datasets import DatasetSpec, SampleRequest, length_bounds, sample_requests
from heron.bench.serve import (
    ClientConfig,
    RequestRecord,
    ServerUnreachable,
    arrival_offsets,
    check_server,
    compute_metrics,
    make_client,
    peak_concurrency,
    run_benchmark,
    tokens_per_bucket,
)
from tests.server_utils import REPO_ROOT, free_port

# ==== the arithmetic on scripted records ==========================================================


def scripted_records() -> list[RequestRecord]:
    """Three successes and a failure with hand-picked times (seconds)."""
    return [
        RequestRecord(True, "", 10, 4, ttft=0.5, itl=[0.1, 0.2, 0.3], latency=1.1, start_time=10.0),
        RequestRecord(True, "", 20, 2, ttft=1.0, itl=[0.4], latency=1.4, start_time=10.5),
        RequestRecord(True, "", 30, 1, ttft=0.3, itl=[], latency=0.3, start_time=11.0),
        RequestRecord(False, "HTTP 500: boom", 40, 0, start_time=10.2),
    ]


def test_metrics_of_scripted_records() -> None:
    m = compute_metrics(scripted_records(), duration_s=2.0, percentiles=[50, 99])
    assert (m.completed, m.failed, m.total_input, m.total_output) == (3, 1, 60, 7)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(33.5)
    # TTFT [500, 1000, 300] ms; p99 interpolates between the 2nd and 3rd sorted values.
    ttft = m.latencies["ttft"]
    assert ttft.mean_ms == pytest.approx(600.0)
    assert ttft.median_ms == pytest.approx(500.0)
    assert ttft.std_ms == pytest.approx(math.sqrt(260000 / 3))
    assert ttft.percentiles_ms == pytest.approx({50.0: 500.0, 99.0: 990.0})
    # TPOT: (1.1 - 0.5) / 3 and (1.4 - 1.0) / 1; the 1-token request has none.
    tpot = m.latencies["tpot"]
    assert (tpot.mean_ms, tpot.median_ms, tpot.percentiles_ms[99.0]) == pytest.approx(
        (300, 300, 398)
    )
    # ITL: every gap of every successful request: [100, 200, 300, 400].
    itl = m.latencies["itl"]
    assert (itl.mean_ms, itl.median_ms, itl.percentiles_ms[99.0]) == pytest.approx((250, 250, 397))
    e2el = m.latencies["e2el"]
    assert (e2el.mean_ms, e2el.median_ms, e2el.percentiles_ms[99.0]) == pytest.approx(
        (2800 / 3, 1100, 1394)
    )
    # A [10, 11.1), B [10.5, 11.9), C [11.0, 11.3) are all open at 11.0.
    assert m.max_concurrent_requests == 3
    # Chunks at 10.5 10.6 10.8 | 11.1, 11.5 11.9, 11.3 -> [3, 4] in 1-s buckets from 10.0.
    assert m.max_output_tokens_per_s == pytest.approx(4.0)


def test_token_buckets_spread_usage_tokens_over_chunks() -> None:
    ok = [r for r in scripted_records() if r.success]
    assert tokens_per_bucket(ok, 1.0) == pytest.approx([3.0, 4.0])
    # A server that sends 10 tokens in 2 chunks: 5 per chunk, the sum stays the total.
    merged = RequestRecord(True, "", 5, 10, ttft=0.2, itl=[1.0], latency=1.2, start_time=0.0)
    assert tokens_per_bucket([merged], 1.0) == pytest.approx([5.0, 5.0])
    assert tokens_per_bucket([merged], 0.5) == pytest.approx([5.0, 0.0, 5.0])


def test_requests_in_flight_per_bucket_are_time_weighted() -> None:
    ok = [r for r in scripted_records() if r.success]
    # [10, 11): A all of it, B half; [11, 12): A 0.1, B 0.9, C 0.3.
    assert serve.in_flight_per_bucket(ok, 1.0) == pytest.approx([1.5, 1.3])


def test_peak_concurrency_touching_intervals_do_not_overlap() -> None:
    a = RequestRecord(True, latency=1.0, start_time=0.0)
    b = RequestRecord(True, latency=1.0, start_time=1.0)  # opens exactly when a closes
    c = RequestRecord(True, latency=0.5, start_time=0.5)
    assert peak_concurrency([a, b]) == 1
    assert peak_concurrency([a, b, c]) == 2


def test_no_successes_report_zeros_and_bad_duration_is_an_error() -> None:
    m = compute_metrics([RequestRecord(False, "x")], 1.0)
    assert (m.completed, m.failed, m.total_output, m.max_concurrent_requests) == (0, 1, 0, 0)
    assert m.latencies["ttft"].mean_ms == 0.0 and m.latencies["itl"].percentiles_ms[99.0] == 0.0
    with pytest.raises(ValueError, match="duration"):
        compute_metrics([], 0.0)


def test_flat_result_keys_and_report_table() -> None:
    m = compute_metrics(scripted_records(), 2.0, [99, 99.9])
    flat = m.to_dict()
    assert flat["mean_ttft_ms"] == pytest.approx(600.0)
    assert flat["p99_e2el_ms"] == pytest.approx(1394.0)
    assert "p99.9_itl_ms" in flat and flat["completed"] == 3 and flat["failed"] == 1
    report = serve.format_report(m, ClientConfig("http://x", "m", max_concurrency=4))
    lines = report.splitlines()
    assert "Successful requests:                     3" in lines
    assert any(
        line.startswith("Maximum request concurrency:") and line.split()[-1] == "4"
        for line in lines
    )
    assert any(
        line.split(":")[0] == "Median TPOT (ms)" and line.split()[-1] == "300.00" for line in lines
    )
    assert any(line.split(":")[0] == "P99.9 ITL (ms)" for line in lines)


def test_prefix_cache_hit_rate_from_usage() -> None:
    stream = serve._Stream(texts=["a"])
    serve._take_usage(stream, {"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 32}})
    record = RequestRecord(prompt_len=40)
    serve._finish(record, stream, None)
    assert (record.prompt_len, record.cached_tokens) == (40, 32)
    other = RequestRecord(True, "", 60, 1, cached_tokens=0, latency=0.1)
    m = compute_metrics([record, other], 1.0)
    assert (m.total_cached, m.prefix_cache_hit_rate) == (32, pytest.approx(0.32))
    assert m.to_dict()["prefix_cache_hit_rate"] == pytest.approx(0.32)
    report = serve.format_report(m, ClientConfig("http://x", "m")).splitlines()
    assert "Prefix cache hit rate (%):               32.00" in report
    silent = compute_metrics(scripted_records(), 2.0)  # no server said cached_tokens
    assert silent.prefix_cache_hit_rate is None and "prefix_cache_hit_rate" not in silent.to_dict()
    assert not any("Prefix cache" in line for line in serve.format_report(
        silent, ClientConfig("http://x", "m")).splitlines())


def test_event_stream_lines_split_at_cr_and_lf_only() -> None:
    """A JSON string may hold NEL or U+2028 raw (llama.cpp's server sends them so): the event
    stays whole, whatever the chunks; CR LF, LF and CR end lines, split across chunks or not."""
    text = "a\u2028b\x85c\u2029d\x0be"
    event = "data: " + json.dumps({"text": text}, ensure_ascii=False)
    stream = f": hi\r\n{event}\r\n\r\n{event}\n\ndata: [DONE]\r"
    for size in (1, 3, len(stream)):
        chunks = [stream[i:i + size] for i in range(0, len(stream), size)]

        async def parsed(chunks: list[str] = chunks) -> list[dict]:
            async def source() -> AsyncIterator[str]:
                for chunk in chunks:
                    yield chunk
            return [data async for _, data in serve.sse_events(serve.sse_lines(source()))]

        assert asyncio.run(parsed()) == [{"text": text}] * 2


def test_arrival_offsets() -> None:
    assert arrival_offsets(5, math.inf, random.Random(0)) == [0.0] * 5
    offsets = arrival_offsets(2000, 4.0, random.Random(1))
    assert offsets[-1] == pytest.approx(500.0)  # num / rate
    gaps = np.diff([0.0, *offsets])
    assert (gaps > 0).all()
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)  # exponential: CV 1
    assert arrival_offsets(10, 2.0, random.Random(3)) == arrival_offsets(10, 2.0, random.Random(3))
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0, random.Random(0))


# ==== a scripted fake OpenAI server ===============================================================


@dataclass
class FakeState:
    """What the fake server received and how many streams it had open at most."""

    api_key: str | None = None
    bodies: list[dict[str, Any]] = field(default_factory=list)
    active: int = 0
    max_active: int = 0


def parse_script(prompt: str, max_tokens: int) -> dict[str, str]:
    """``"n=3 delay=0.2 gap=0.05 usage=7"``; a prompt without ``=`` streams max_tokens chunks."""
    script = {"n": str(max_tokens), "delay": "0.005", "gap": "0", "usage": str(max_tokens)}
    script.update(part.split("=", 1) for part in prompt.split() if "=" in part and "=" in prompt)
    return script


def fake_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await respond(state, await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await respond(state, await request.json(), chat=True)

    return app


async def respond(state: FakeState, body: dict[str, Any], chat: bool) -> Any:
    state.bodies.append(body)
    prompt = body["messages"][-1]["content"] if chat else body["prompt"]
    script = parse_script(prompt, body["max_tokens"])
    if "fail" in script:
        return JSONResponse(
            {"error": {"message": "scripted failure", "code": 500}}, status_code=500
        )
    return StreamingResponse(stream(state, script, chat, body), media_type="text/event-stream")


async def stream(
    state: FakeState, script: dict[str, str], chat: bool, body: dict[str, Any]
) -> AsyncIterator[str]:
    state.active += 1
    state.max_active = max(state.max_active, state.active)
    try:
        if chat:  # role first, at once: must not count as the first token
            yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(float(script["delay"]))
        for i in range(int(script["n"])):
            if i:
                await asyncio.sleep(float(script["gap"]))
            text = "w " * int(script.get("words", "1"))
            yield event(
                {
                    "choices": [
                        {"index": 0, "delta": {"content": text}}
                        if chat
                        else {"index": 0, "text": text}
                    ]
                }
            )
            if script.get("error_after") == str(i + 1):
                yield event({"error": {"message": "scripted stream error", "code": 500}})
                yield "data: [DONE]\n\n"
                return
        finish = {"delta": {}} if chat else {"text": ""}
        yield event({"choices": [{"index": 0, "finish_reason": "length", **finish}]})
        if body.get("stream_options", {}).get("include_usage") and script["usage"] != "none":
            yield event({"choices": [], "usage": {"completion_tokens": int(script["usage"])}})
        yield "data: [DONE]\n\n"
    finally:
        state.active -= 1


def event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, FakeState]]:
    state = FakeState()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            fake_app(state), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the fake server did not start"
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=5)


def bench(url: str, requests: list[SampleRequest], **kwargs: Any) -> serve.BenchmarkRun:
    counter = kwargs.pop("count_tokens", None)
    config = ClientConfig(url, "fake-model", **kwargs)

    async def go() -> serve.BenchmarkRun:
        async with make_client(len(requests)) as client:
            return await run_benchmark(
                client, config, requests, count_tokens=counter, progress=False
            )

    return asyncio.run(go())


def sample(prompt: str, output_len: int = 8, prompt_len: int = 11) -> SampleRequest:
    return SampleRequest(prompt, prompt_len, output_len)


def test_client_times_counts_and_failures(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    state.bodies.clear()
    requests = [
        sample("n=3 delay=0.2 gap=0.05 usage=7"),  # usage says 7 tokens in 3 chunks
        sample("fail=1"),  # HTTP 500
        sample("n=4 delay=0.01 gap=0.01 error_after=2"),  # an error event mid-stream
        sample("n=3 delay=0.01 gap=0.01 usage=none words=2"),  # no usage: counted by the tokenizer
    ]
    run = bench(url, requests, ignore_eos=True, count_tokens=lambda text: len(text.split()))
    ok, failed500, failed_stream, counted = run.records
    assert ok.success and ok.error == ""
    assert ok.output_tokens == 7 and ok.prompt_len == 11
    # Scripted: first text after 0.2 s, then 2 more 0.05 s apart (upper bounds leave room
    # for a loaded machine).
    assert 0.2 <= ok.ttft < 1.0
    assert len(ok.itl) == 2 and all(0.045 <= gap < 0.5 for gap in ok.itl)
    assert ok.latency == pytest.approx(ok.ttft + sum(ok.itl), abs=1e-9)
    assert ok.tpot == pytest.approx((ok.latency - ok.ttft) / 6)
    assert ok.generated_text == "w w w "
    assert not failed500.success and failed500.error == "HTTP 500: scripted failure"
    assert not failed_stream.success and failed_stream.error == "scripted stream error"
    assert counted.success and counted.output_tokens == 6 and len(counted.itl) == 2
    m = compute_metrics(run.records, run.duration_s)
    assert (m.completed, m.failed, m.total_output, m.total_input) == (2, 2, 13, 22)
    assert run.duration_s >= ok.latency
    body = next(b for b in state.bodies if b["prompt"] == requests[0].prompt)
    assert body == {
        "model": "fake-model",
        "prompt": requests[0].prompt,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


def test_chat_endpoint_role_chunk_is_not_the_first_token(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    state.bodies.clear()
    run = bench(
        url, [sample("n=2 delay=0.15 gap=0.02 usage=none")], endpoint="/v1/chat/completions"
    )
    (record,) = run.records
    assert record.success and 0.15 <= record.ttft < 1.0 and len(record.itl) == 1
    assert record.output_tokens == 2  # no usage and no tokenizer: one token per text chunk
    assert state.bodies[0]["messages"] == [
        {"role": "user", "content": "n=2 delay=0.15 gap=0.02 usage=none"}
    ]
    assert "ignore_eos" not in state.bodies[0]


def test_max_concurrency_limits_open_requests(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    state.max_active = 0
    run = bench(url, [sample("n=2 delay=0.1 gap=0.05")] * 4, max_concurrency=2)
    assert all(r.success for r in run.records)
    assert state.max_active == 2
    assert peak_concurrency(run.records) == 2
    assert run.duration_s >= 0.3  # two waves of 0.15 s


def test_request_rate_spaces_the_sends(fake: tuple[str, FakeState]) -> None:
    url, _ = fake
    run = bench(url, [sample("n=1 delay=0")] * 4, request_rate=5.0, seed=5)
    starts = [r.start_time - run.records[0].start_time for r in run.records]
    expected = arrival_offsets(4, 5.0, random.Random(5))
    expected = [t - expected[0] for t in expected]  # [0, 0.16, 0.35, 0.68]
    assert starts == pytest.approx(expected, abs=0.08)
    assert run.duration_s >= expected[-1]


def test_check_server(fake: tuple[str, FakeState]) -> None:
    url, state = fake

    async def check(base: str, headers: dict[str, str]) -> list[str]:
        async with make_client(1) as client:
            return await check_server(client, base, headers)

    assert asyncio.run(check(url, {})) == ["fake-model"]
    state.api_key = "sk-right"
    try:
        with pytest.raises(ServerUnreachable, match="API key"):
            asyncio.run(check(url, {"Authorization": "Bearer sk-wrong"}))
        assert asyncio.run(check(url, {"Authorization": "Bearer sk-right"})) == ["fake-model"]
    finally:
        state.api_key = None
    with pytest.raises(ServerUnreachable, match="cannot reach the server"):
        asyncio.run(check(f"http://127.0.0.1:{free_port()}", {}))


def test_unreachable_server_is_a_one_line_error() -> None:
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "heron.bench.serve",
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--num-prompts",
            "2",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f"heron bench serve: error: cannot reach the server at http://127.0.0.1:{port}"
    )


# ==== prompts from a tokenizer ===================================================================

CORPUS = (
    "the quick brown fox jumps over the lazy dog while seven wizards quietly hex "
    "bright jumping zebras; benchmarks measure latency and throughput of servers. "
) * 20


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE tokenizer (merges make decode-then-encode change lengths)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [CORPUS],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)
    return path


def test_random_prompts_encode_to_their_lengths(bpe_dir: Path) -> None:
    tok = serve.load_bench_tokenizer(str(bpe_dir))
    spec = DatasetSpec(
        "random", num_prompts=40, input_len=50, output_len=20, range_ratio=0.5, seed=3
    )
    requests = sample_requests(tok, spec)
    assert [len(tok.encode(r.prompt)) for r in requests] == [r.prompt_len for r in requests]
    low, high = length_bounds(50, 0.5)
    assert (low, high) == (25, 75)
    assert all(low <= r.prompt_len <= high for r in requests)
    assert all(10 <= r.output_len <= 30 for r in requests)
    assert len({r.prompt_len for r in requests}) > 5 and len({r.prompt for r in requests}) == 40
    assert sample_requests(tok, spec) == requests  # the seed fixes them
    exact = sample_requests(tok, DatasetSpec(num_prompts=5, input_len=64, output_len=3))
    assert [(len(tok.encode(r.prompt)), r.prompt_len, r.output_len) for r in exact] == [
        (64, 64, 3)
    ] * 5


def test_prefix_prompts_share_their_prefix(bpe_dir: Path) -> None:
    tok = serve.load_bench_tokenizer(str(bpe_dir))
    spec = DatasetSpec(
        "prefix", num_prompts=6, input_len=10, output_len=4, prefix_len=80, num_prefixes=2
    )
    requests = sample_requests(tok, spec)
    ids = [tok.encode(r.prompt) for r in requests]
    assert [len(i) for i in ids] == [r.prompt_len for r in requests] == [90] * 6
    # Prompts 0, 2, 4 share one prefix and 1, 3, 5 another (up to a merge at the boundary).
    for group in (ids[0::2], ids[1::2]):
        assert all(i[:78] == group[0][:78] for i in group)
        assert len({tuple(i[78:]) for i in group}) == 3
    assert ids[0][1:40] != ids[1][1:40]
    with pytest.raises(ValueError, match="prefix-len"):
        DatasetSpec("prefix", prefix_len=0)


# ==== the whole command ===========================================================================


def test_command_runs_saves_and_plots(
    fake: tuple[str, FakeState], bpe_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = fake
    state.bodies.clear()
    result, plot = tmp_path / "r.json", tmp_path / "r.png"
    code = serve.main(
        [
            "--base-url",
            url,
            "--tokenizer",
            str(bpe_dir),
            "--num-prompts",
            "5",
            "--input-len",
            "32",
            "--output-len",
            "6",
            "--max-concurrency",
            "2",
            "--ignore-eos",
            "--metric-percentiles",
            "50,99",
            "--disable-tqdm",
            "--save-result",
            str(result),
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Successful requests:                     5" in out and "P50 TTFT (ms):" in out
    data = json.loads(result.read_text())
    assert (data["completed"], data["failed"], data["total_output_tokens"]) == (5, 0, 30)
    assert data["model_id"] == "fake-model" and data["max_concurrency"] == 2
    assert data["input_lens"] == [32] * 5 and data["output_lens"] == [6] * 5
    assert [len(itl) for itl in data["itls"]] == [5] * 5
    assert data["request_rate"] == "inf" and "p50_tpot_ms" in data
    tok = serve.load_bench_tokenizer(str(bpe_dir))
    assert sorted(len(tok.encode(b["prompt"])) for b in state.bodies) == [32] * 5
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_add_parser_registers_the_subcommand() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="heron bench")
    serve.add_parser(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(["serve", "--dataset-name", "prefix", "--request-rate", "2.5"])
    assert args.func is serve.run and args.bench_command == "serve"
    assert (args.base_url, args.endpoint, args.num_prompts) == (
        "http://127.0.0.1:8000",
        "/v1/completions",
        100,
    )
    assert args.request_rate == 2.5 and args.max_concurrency is None
    assert serve.dataset_spec(args).prefix_len == 256  # the prefix dataset's default
    with pytest.raises(ValueError, match="percentiles"):
        serve.parse_percentiles("50,abc")
