"""End to end: what a careless client or an attacker sends is refused cleanly and costs little.

One tiny random model server for the module (output text does not matter here): lone
surrogates, integers past 64 bits, loose types, unknown field names, request fan-out, the
response queues those requests leave behind, Host and CORS rules, and /health's contract.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from heron.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS
from heron.server.security import HostCheck
from tests.server_utils import RemoteServer
from tests.tiny_models import save_tiny_server_model

MAX_SEQS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    model = save_tiny_server_model(tmp_path_factory.mktemp("tiny-hardening"))
    args = [str(model), "--kv-cache-memory", "16MiB", "--max-n", "4",
            "--max-seqs-per-request", str(MAX_SEQS), "--allowed-origins", "*",
            "--max-num-seqs", str(MAX_SEQS // 2)]
    with RemoteServer(args) as srv:
        yield srv


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": "Hello", "max_tokens": 1, **fields}


def post(server: RemoteServer, path: str, body: dict[str, Any]) -> httpx.Response:
    """JSON with ASCII escapes: a lone surrogate travels as the six characters \\ud800."""
    return httpx.post(server.url(path), content=json.dumps(body), timeout=60,
                      headers={"Content-Type": "application/json"})


def check_400(resp: httpx.Response, param: str | None) -> str:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    return str(error["message"])


def in_flight(server: RemoteServer) -> float:
    text = httpx.get(server.url("/metrics")).text
    match = re.search(r"^heron:num_sequences_in_flight\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert match is not None, "heron:num_sequences_in_flight not in /metrics"
    return float(match.group(1))


# ---- item 6: lone surrogates ----------------------------------------------------------------------

SURROGATES = [
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "a\ud800"}]),
     "messages[0].content"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "\udfff"}]}]), "messages[0].content[0].text"),
    ("/v1/completions", completion(prompt="x\ud800y"), "prompt"),
    ("/v1/completions", completion(prompt=["ok", "\ud800"]), "prompt[1]"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", completion(model="m\ud800"), "model"),
    ("/v1/chat/completions", chat(stop=["fine", "\udc00"]), "stop[1]"),
    ("/v1/completions", completion(**{"odd\ud800key": 1}), "odd\\ud800key"),
    ("/v1/responses", {"input": [{"role": "user", "content": "a\ud800"}]}, "input[0].content"),
    ("/v1/responses", {"input": "x", "instructions": "\udfff"}, "instructions"),
    ("/v1/embeddings", {"input": ["ok", "\ud800"]}, "input[1]"),
]


@pytest.mark.parametrize("path,body,param", SURROGATES, ids=[s[2] for s in SURROGATES])
def test_lone_surrogate_is_a_400_naming_the_field(
    server: RemoteServer, path: str, body: dict[str, Any], param: str
) -> None:
    message = check_400(post(server, path, body), param)
    assert "surrogate" in message


# ---- item 5: integers past 64 bits, and the queues they leaked ------------------------------------

BIG = [
    ("/v1/chat/completions", chat(top_k=2**64), "top_k"),
    ("/v1/chat/completions", chat(top_k=2**63), "top_k"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                              "min_tokens": 2**64}, "min_tokens"),
    ("/v1/completions", {"prompt": "Hi", "min_tokens": 2**70}, "min_tokens"),
    ("/v1/completions", completion(max_tokens=2**64), "max_tokens"),
    ("/v1/completions", completion(logprobs=2**64), "logprobs"),
    ("/v1/chat/completions", chat(n=2**64), "n"),
    ("/v1/chat/completions", chat(seed=2**64), "seed"),
    ("/v1/chat/completions", chat(stop_token_ids=[2**64]), "stop_token_ids"),
    ("/v1/chat/completions", chat(logit_bias={str(2**64): 1}), "logit_bias"),
    ("/v1/completions", completion(prompt=[1, 2**64]), "prompt"),
    ("/detokenize", {"tokens": [2**64]}, "tokens"),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 2**64}, "max_output_tokens"),
    ("/v1/responses", {"input": "Hi", "temperature": 2**64}, "temperature"),
    ("/v1/embeddings", {"input": [1, 2**64]}, "input"),
    ("/v1/embeddings", {"input": "Hi", "dimensions": 2**64}, "dimensions"),
]


@pytest.mark.parametrize("path,body,param", BIG, ids=[f"{b[2]}-{i}" for i, b in enumerate(BIG)])
def test_integer_past_64_bits_is_a_400_naming_the_field(
    server: RemoteServer, path: str, body: dict[str, Any], param: str
) -> None:
    check_400(post(server, path, body), param)


def test_largest_seed_with_n_is_served_and_no_queue_is_left(server: RemoteServer) -> None:
    for _ in range(3):  # each failed before: 2^64 - 1 + i does not fit the message
        r = post(server, "/v1/chat/completions", chat(seed=2**64 - 1, n=2, max_tokens=2))
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2
    for path, body, _ in BIG[:4]:
        post(server, path, body)
    assert in_flight(server) == 0


# ---- item 11: strict types and bounded quoting ----------------------------------------------------

LOOSE = [
    (chat(max_tokens=True), "max_tokens"),
    (chat(max_tokens="4"), "max_tokens"),
    (chat(max_tokens=4.0), "max_tokens"),
    (chat(stream="yes"), "stream"),
    (chat(n="2"), "n"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(stream=False, stream_options={"include_usage": True}), "stream_options"),
    (chat(logit_bias={"+5": 1}), "logit_bias"),
    (chat(logit_bias={" 5": 1}), "logit_bias"),
    (chat(logit_bias={"5_0": 1}), "logit_bias"),
    (chat(logit_bias={"\u0661": 1}), "logit_bias"),  # ARABIC-INDIC DIGIT ONE: int() reads it
    (chat(logit_bias={"-1": 1}), "logit_bias"),
    (chat(logprobs="true"), "logprobs"),
]


@pytest.mark.parametrize("body,param", LOOSE, ids=[str(i) for i in range(len(LOOSE))])
def test_loose_types_are_400s(server: RemoteServer, body: dict[str, Any], param: str) -> None:
    check_400(post(server, "/v1/chat/completions", body), param)


def test_strict_values_still_pass(server: RemoteServer) -> None:
    ok = chat(max_tokens=2, logit_bias={"5": 1.0, "007": -1}, temperature=1, top_p=1,
              stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=ok, timeout=60) as r:
        assert r.status_code == 200
        assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"


def test_stop_strings_are_bounded(server: RemoteServer) -> None:
    """Each output step scans every stop string on the event loop every request shares: 350,000
    of them (3.8 MB, under the body limit) stalled all other requests ~0.3 s per token."""
    many = [f"s{i:06d}" for i in range(MAX_STOP_STRINGS + 1)]
    long = ["x" * (MAX_STOP_CHARS // 2), "y" * (MAX_STOP_CHARS // 2 + 1)]
    for stop in (many, long):
        for path, body in (("/v1/chat/completions", chat(stop=stop)),
                           ("/v1/completions", completion(stop=stop))):
            message = check_400(post(server, path, body), "stop")
            assert message.startswith(f"stop must be at most {MAX_STOP_STRINGS} strings of "
                                      f"{MAX_STOP_CHARS} characters in all, got [")
    width = MAX_STOP_CHARS // MAX_STOP_STRINGS
    full = [f"{i:0{width}d}" for i in range(MAX_STOP_STRINGS)]  # both limits, exactly
    assert post(server, "/v1/completions", completion(stop=full)).status_code == 200


@pytest.mark.parametrize("body,param", [
    (chat(model="m" * 100_000), "model"),
    (chat(messages=[{"role": "r" * 100_000, "content": "x"}]), "messages[0].role"),
    (chat(temperature=[0.5] * 50_000), "temperature"),
    (chat(stop=["ok"] * 30_000 + [""]), "stop"),
    (chat(logit_bias={"9" * 5000: 1}), "logit_bias"),
    (completion(prompt=[[1] * 10, [5] * 50_000 + [10**9]]), "prompt"),
])
def test_error_messages_quote_little_of_the_input(
    server: RemoteServer, body: dict[str, Any], param: str
) -> None:
    r = post(server, "/v1/completions" if "prompt" in body else "/v1/chat/completions", body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param
    assert len(r.json()["error"]["message"]) < 400, r.json()["error"]["message"][:500]


# ---- items 4 and 11: constraints that cannot be met are refused up front -----------------------

UNMEETABLE = [
    ("guided_regex", r"[^\s\S]", "accepts no output at all"),
    ("guided_json", {"$ref": "#"}, "accepts no output at all"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "#"}}}, "accepts no output at all"),
    ("guided_grammar", 'start: "a" start', "cannot be enforced"),
    ("guided_grammar", "start: " + " | ".join(f'"w{i}"' for i in range(20_000)),
     "cannot be enforced"),
]


@pytest.mark.parametrize("field,value,message", UNMEETABLE,
                         ids=[f"{u[0]}-{i}" for i, u in enumerate(UNMEETABLE)])
def test_a_constraint_that_cannot_be_met_is_a_400_up_front(
    server: RemoteServer, field: str, value: object, message: str
) -> None:
    r = post(server, "/v1/chat/completions", chat(**{field: value}))
    assert message in check_400(r, field)
    assert r.json()["error"]["code"] == "invalid_constraint"


# ---- item 7: unknown field names ------------------------------------------------------------------


def test_unknown_field_names_are_400s_escaped_and_cut(server: RemoteServer) -> None:
    """An unknown field is refused (as OpenAI does) with its name escaped and cut, and
    nothing is logged of it: a name that forges a log line, or 300 names of 1000
    characters, cost no log lines."""
    forged = "evil\n2099-01-01 00:00:00 INFO heron: forged line " + "x" * 200_000
    message = check_400(post(server, "/v1/completions", completion(**{forged: 1})),
                        "evil\\n2099-01-01 00:00:00 INFO heron: forged line " + "x" * 11 + "...")
    assert message.startswith("Unknown parameter: 'evil\\n2099-01-01")
    many = {f"field_{i:04d}_" + "y" * 1000: i for i in range(300)}
    assert post(server, "/v1/completions", completion(**many)).status_code == 400
    log = server.log_text()
    assert "evil" not in log and "field_0000" not in log
    assert not any(line.startswith("2099-01-01") for line in log.splitlines())


def test_unknown_field_names_cost_no_memory(server: RemoteServer) -> None:
    api = psutil.Process(server.proc.pid)
    body = completion(**{"n" + "z" * (1 << 20): 1})  # a 1 MiB field name
    post(server, "/v1/completions", body)  # allocator warm-up
    before = api.memory_info().rss
    for i in range(40):
        name = f"{i}" + "z" * (1 << 20)
        assert post(server, "/v1/completions", completion(**{name: 1})).status_code == 400
    grown = api.memory_info().rss - before
    assert grown < 24 << 20, f"the API process grew by {grown >> 20} MiB"


# ---- item 8: sequences per request ----------------------------------------------------------------


def test_prompts_times_n_is_capped(server: RemoteServer) -> None:
    message = check_400(post(server, "/v1/completions", completion(prompt=["a"] * 5, n=2)),
                        "prompt")
    assert "10 sequences" in message and "--max-seqs-per-request" in message
    check_400(post(server, "/v1/completions", completion(prompt=["a"] * (MAX_SEQS + 1))),
              "prompt")
    r = post(server, "/v1/completions", completion(prompt=["a"] * 4, n=2))
    assert r.status_code == 200 and len(r.json()["choices"]) == MAX_SEQS


def test_a_later_request_does_not_wait_for_all_of_a_big_one(server: RemoteServer) -> None:
    """8 sequences on 4 batch slots, then a 1-sequence request: it takes the first free slot
    (fair turns), and so finishes when about half of the big request's time has passed (it
    would wait for all of it without the turns). Times are relative to the big request's first
    chunk, so the check holds on a fast machine as on a slow one."""
    big = completion(prompt=[f"big {i}" for i in range(MAX_SEQS)], max_tokens=150,
                     ignore_eos=True, stream=True)
    finished: dict[str, float] = {}
    with httpx.stream("POST", server.url("/v1/completions"), json=big, timeout=300) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the big request is in the engine
        started = time.monotonic()
        small = post(server, "/v1/completions", completion(prompt="small", max_tokens=2,
                                                           ignore_eos=True))
        finished["small"] = time.monotonic()
        assert small.status_code == 200
        done = [line for line in lines if '"finish_reason":"length"' in line]
        finished["big"] = time.monotonic()
    assert len(done) == MAX_SEQS
    small_share = (finished["small"] - started) / (finished["big"] - started)
    assert small_share < 0.75, (small_share, finished)


def test_no_response_queue_outlives_its_request(server: RemoteServer) -> None:
    assert in_flight(server) == 0


# ---- item 10: Host and CORS -----------------------------------------------------------------------


def test_a_foreign_host_name_is_refused_on_loopback(server: RemoteServer) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 is not answered."""
    for path in ("/v1/models", "/health", "/v1/completions"):
        r = httpx.get(server.url(path), headers={"Host": f"evil.example:{server.port}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", r.text
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "app.localhost"):
        assert httpx.get(server.url("/v1/models"), headers={"Host": host}).status_code == 200


def test_host_rules() -> None:
    loopback = HostCheck("127.0.0.1", ())
    assert [loopback.allows(h) for h in ("localhost:8000", "[::1]:8000", "127.1.2.3", None)] == [
        True, True, True, True]
    assert not any(loopback.allows(h) for h in ("evil.example", "localhost.evil.example",
                                                "0.0.0.0:8000", "10.0.0.5"))
    named = HostCheck("::1", ["api.internal"])
    assert named.allows("API.internal:443") and named.allows("localhost")
    assert not named.allows("evil.example")
    assert HostCheck("127.0.0.1", ["*"]).allows("evil.example")
    assert HostCheck("0.0.0.0", ()).allows("evil.example")  # not loopback: no default check
    assert not HostCheck("0.0.0.0", ["api.internal"]).allows("evil.example")


def test_wildcard_cors_sends_no_credentials_and_never_allows_null(server: RemoteServer) -> None:
    r = httpx.get(server.url("/v1/models"), headers={"Origin": "http://any.example"})
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers
    preflight = httpx.options(server.url("/v1/chat/completions"), headers={
        "Origin": "http://any.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in preflight.headers
    null = httpx.get(server.url("/v1/models"), headers={"Origin": "null", "Cookie": "a=b"})
    assert null.status_code == 200
    assert not any(h.startswith("access-control-") for h in null.headers)
    null_preflight = httpx.options(server.url("/v1/models"), headers={
        "Origin": "null", "Access-Control-Request-Method": "GET"})
    assert null_preflight.status_code == 400
    assert not any(h.startswith("access-control-") for h in null_preflight.headers)


# ---- item 12: /health's contract ------------------------------------------------------------------


def test_health_answers_head_and_its_openapi_entry_matches(server: RemoteServer) -> None:
    get, head = httpx.get(server.url("/health")), httpx.head(server.url("/health"))
    assert (get.status_code, get.content, head.status_code, head.content) == (200, b"", 200, b"")
    spec = httpx.get(server.url("/openapi.json")).json()
    entry = spec["paths"]["/health"]
    assert set(entry) == {"get", "head"}
    for operation in entry.values():
        responses = operation["responses"]
        assert set(responses) == {"200", "503"}
        assert "One engine: an empty body" in responses["200"]["description"]  # as served here
        ok = responses["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": "#/components/schemas/HealthStatus"}  # several engines' report
        down = responses["503"]["content"]["application/json"]["schema"]["anyOf"]
        assert down == [{"$ref": "#/components/schemas/ErrorResponse"},
                        {"$ref": "#/components/schemas/HealthStatus"}]
    statuses = spec["components"]["schemas"]["HealthStatus"]["properties"]["status"]["enum"]
    assert statuses == ["loading", "ok", "degraded", "down"]
