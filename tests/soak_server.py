"""The soak workload (tests/soak_workload.py) through a real ``heron serve``: concurrent clients,
streamed and whole answers, clients that disconnect mid-answer.

    report = run_server_case(case)     # starts a server, sends the case, compares, stops it

Each request of the case goes to ``/v1/completions`` (token-id prompt) at its arrival time
(``STEP_S`` per engine step of the offline schedule), streamed or not at random; a request
the case aborts is a client that hangs up: a stream closed after a few chunks, or a whole
answer given up after a short timeout. Afterwards the server must answer ``/health``, its
``/metrics`` must settle to nothing running, waiting or in flight, and every greedy or seeded
request that was not abandoned must equal the offline engine's answer to it alone (text,
finish reason, logprobs within the case's tolerance; usage counts).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from typing import Any

import httpx

from heron.engine.runner import ModelRunner
from heron.outputs import RequestOutput
from tests.server_utils import RemoteServer
from tests.soak_workload import (
    LOGPROB_TOL,
    LOGPROB_TOL_F32,
    Case,
    Report,
    Spec,
    check_engine_idle,
    run_alone,
)

STEP_S = 0.01  # seconds per arrival step
MODEL_NAME = "soak"


def serve_args(case: Case, kv_bytes: int) -> list[str]:
    s = case.settings
    args = [s.model.path, "--served-model-name", MODEL_NAME, "--tokenizer", s.model.tokenizer,
            "--dtype", s.model.dtype, "--quantization", s.model.quantization, "--max-model-len", str(s.max_model_len),
            "--block-size", str(s.block_size), "--max-num-seqs", str(s.max_num_seqs),
            "--max-num-batched-tokens", str(s.max_num_batched_tokens),
            "--kv-cache-memory", str(kv_bytes)]
    return args + ([] if s.prefix_caching else ["--no-enable-prefix-caching"])


def http_params(spec: Spec) -> Spec:
    """The spec as the completions API can ask it: prompt logprobs only come with echo, which
    this pass leaves off."""
    return Spec(spec.rid, spec.prompt, spec.params.clone(prompt_logprobs=None), spec.kind,
                spec.arrive, spec.abort_after)


def request_body(spec: Spec, stream: bool) -> dict[str, Any]:
    p = spec.params
    body: dict[str, Any] = {
        "model": MODEL_NAME, "prompt": spec.prompt, "stream": stream, "n": p.n,
        "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "min_p": p.min_p,
        "ignore_eos": p.ignore_eos, "min_tokens": p.min_tokens,
        "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
        "repetition_penalty": p.repetition_penalty,
        "include_stop_str_in_output": p.include_stop_str_in_output}
    optional = {"max_tokens": p.max_tokens, "seed": p.seed, "logprobs": p.logprobs,
                "stop": p.stop or None, "stop_token_ids": p.stop_token_ids or None,
                "logit_bias": {str(k): v for k, v in (p.logit_bias or {}).items()} or None}
    body.update({k: v for k, v in optional.items() if v is not None})
    if stream:
        body["stream_options"] = {"include_usage": True}
    so = p.structured_outputs
    if so is not None:
        body["structured_outputs"] = {so.kind: json.loads(so.spec) if so.kind != "regex"
                                      else so.spec}
    return body


# ============================================================================ the clients


async def _whole(client: httpx.AsyncClient, body: dict, timeout: float | None) -> dict:
    """A non-streamed answer, its choices in the form ``_streamed`` folds a stream into."""
    r = await client.post("/v1/completions", json=body, timeout=timeout)
    if r.status_code != 200:
        return {"error": f"status {r.status_code}: {r.text[:300]}"}
    answer = r.json()
    answer["choices"] = [{"index": c["index"], "text": c["text"],
                          "finish_reason": c["finish_reason"],
                          "lp": _entries(c["logprobs"]) if c.get("logprobs") else []}
                         for c in answer["choices"]]
    return answer


async def _streamed(client: httpx.AsyncClient, body: dict, hang_up_after: int | None) -> dict:
    """The stream folded into a whole answer; ``hang_up_after``: close after that many chunks."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    chunks = 0
    async with client.stream("POST", "/v1/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            return {"error": f"status {r.status_code}: {(await r.aread())[:300]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                return {"hung_up": True}
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices", []):
                _fold(choices.setdefault(c["index"], {"index": c["index"], "text": "",
                                                     "finish_reason": None, "lp": []}), c)
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def _fold(acc: dict[str, Any], c: dict[str, Any]) -> None:
    acc["text"] += c.get("text", "")
    acc["finish_reason"] = c.get("finish_reason") or acc["finish_reason"]
    lp = c.get("logprobs")
    if lp:
        acc["lp"] += _entries(lp)


def _entries(lp: dict[str, Any]) -> list[tuple[str, float, dict[str, float]]]:
    return [(tok, val, dict(top or {})) for tok, val, top in
            zip(lp["tokens"], lp["token_logprobs"], lp.get("top_logprobs") or [None] * len(
                lp["tokens"]))]


async def _client(base: str, spec: Spec, rng: random.Random) -> tuple[Spec, dict]:
    await asyncio.sleep(spec.arrive * STEP_S)
    stream = rng.random() < 0.5
    body = request_body(spec, stream or spec.abort_after is not None)
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        if spec.abort_after is not None:
            if rng.random() < 0.5:  # a stream closed early
                return spec, await _streamed(client, body, spec.abort_after)
            body["stream"] = False
            body.pop("stream_options", None)
            try:  # a whole answer given up on (or in time)
                return spec, await _whole(client, body, timeout=STEP_S * spec.abort_after)
            except httpx.TimeoutException:
                return spec, {"hung_up": True}
        if stream:
            return spec, await _streamed(client, body, None)
        return spec, await _whole(client, body, None)


async def _send_all(base: str, specs: list[Spec], seed: int) -> list[tuple[Spec, dict]]:
    rng = random.Random(seed)
    return await asyncio.gather(*[_client(base, s, random.Random(rng.random())) for s in specs])


# ============================================================================ checks


def metrics(server: RemoteServer) -> dict[str, float]:
    text = httpx.get(server.url("/metrics"), timeout=10).text
    found = {}
    for name in ("num_requests_running", "num_requests_waiting", "num_sequences_in_flight",
                 "kv_cache_usage_perc"):
        match = re.search(rf"^heron:{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else float("nan")
    return found


def _counter(server: RemoteServer, name: str) -> float:
    text = httpx.get(server.url("/metrics"), timeout=10).text
    match = re.search(rf"^heron:{name}_total\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def settle(server: RemoteServer, timeout_s: float = 20.0) -> dict[str, float]:
    """/metrics once nothing runs, waits or is in flight (or the last reading at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(server)
        idle = all(m[k] == 0 for k in ("num_requests_running", "num_requests_waiting",
                                        "num_sequences_in_flight", "kv_cache_usage_perc"))
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def compare_answer(spec: Spec, answer: dict, alone: RequestOutput, tol: float) -> list[str]:
    if "error" in answer:
        return [answer["error"]]
    choices = answer["choices"]
    if len(choices) != len(alone.outputs):
        return [f"{len(choices)} choices, offline {len(alone.outputs)}"]
    problems = []
    for c, o in zip(choices, alone.outputs):
        if (c["text"], c["finish_reason"]) != (o.text, o.finish_reason):
            problems.append(f"choice {o.index}: {(c['text'], c['finish_reason'])!r} != offline "
                            f"{(o.text, o.finish_reason)!r}")
            continue
        if spec.params.logprobs is not None:
            want = [e[t].logprob for t, e in zip(o.token_ids, o.logprobs or [])]
            got = [val for _, val, _ in c["lp"]]
            if len(got) != len(want) or any(abs(a - b) > tol for a, b in zip(got, want)):
                problems.append(f"choice {o.index}: logprobs {got} != offline {want}")
    usage = answer.get("usage") or {}
    tokens = sum(len(o.token_ids) for o in alone.outputs)
    if (usage.get("prompt_tokens"), usage.get("completion_tokens")) != (len(spec.prompt), tokens):
        problems.append(f"usage {usage} for {len(spec.prompt)} prompt and {tokens} output tokens")
    return problems


def run_server_case(case: Case) -> Report:
    """Serve the case's model with its settings, send its requests concurrently, check."""
    reference = case.settings.make()
    engine = reference.engine
    kv_bytes = case.settings.num_blocks * ModelRunner.kv_bytes_per_block(
        engine.model, case.settings.block_size, engine.dtype)
    specs = [http_params(s) for s in case.specs if s.pooling is None]  # completions only
    report = Report(case.seed, case.settings, requests=len(specs))
    with RemoteServer(serve_args(case, kv_bytes), env={"OMP_NUM_THREADS": "1"}) as server:
        answers = asyncio.run(_send_all(server.base_url, specs, case.seed))
        if httpx.get(server.url("/health"), timeout=10).status_code != 200:
            report.failures.append("/health is not 200 after the load")
        m = settle(server)
        if any(m[k] != 0 for k in m):
            report.failures.append(f"/metrics after the load: {m}")
        report.preemptions = int(_counter(server, "num_preemptions"))
        report.prefix_hits = int(_counter(server, "prefix_cache_hits"))
        # still serving, and right: one more request after the storm
        first = specs[0] if specs else case.specs[0]
        last = Spec(-1, first.prompt, first.params.clone(  # an embedding's params: 1 token
            temperature=0.0, n=1, prompt_logprobs=None, structured_outputs=None,
            max_tokens=first.params.max_tokens if specs else 1), "greedy", 0)
        answers.append(asyncio.run(_send_all(server.base_url, [last], 0))[0])
    tol = LOGPROB_TOL_F32 if case.settings.model.dtype == "float32" else LOGPROB_TOL
    for spec, answer in answers:
        if answer.get("hung_up"):
            report.aborted += 1
            continue
        if spec.kind == "random":
            if "error" in answer:
                report.failures.append(f"{spec.describe()}: {answer['error']}")
            continue
        report.compared += 1
        alone = run_alone(reference, spec)
        report.failures += [f"{spec.describe()}: {p}"
                            for p in compare_answer(spec, answer, alone, tol)]
    report.failures += [f"reference engine: {p}" for p in check_engine_idle(reference)]
    return report
