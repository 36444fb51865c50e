"""End to end: every error path answers OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.server_utils import DEFAULT_MODEL_NAME, RemoteServer

pytestmark = pytest.mark.slow

MODEL = DEFAULT_MODEL_NAME
MAX_MODEL_LEN = 256
MAX_BYTES = 64 * 1024
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    args = (
        f"--served-model-name {MODEL} --max-model-len {MAX_MODEL_LEN} --max-request-bytes 64KiB "
        "--max-n 4 --max-logprobs 5 --kv-cache-memory 64MiB --allowed-origins http://example.com"
    ).split()
    with RemoteServer(args) as srv:
        yield srv


def check_error(
    resp: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def check_still_serving(server: RemoteServer) -> None:
    r = httpx.post(
        server.url("/v1/completions"),
        json={"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields}


BAD_CHAT = [
    (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (chat(messages=[]), None),
    (chat(messages="hello"), "messages"),
    (
        chat(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        ),
        "messages[0].content[0].type",
    ),
    (chat(messages=[{"role": "user"}]), None),
    (chat(temperature=3.5), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_k=-5), "top_k"),
    (chat(min_p=1.5), "min_p"),
    (chat(n=0), "n"),
    (chat(n=5), "n"),
    (chat(presence_penalty=-3), "presence_penalty"),
    (chat(frequency_penalty=2.5), "frequency_penalty"),
    (chat(repetition_penalty=0), "repetition_penalty"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens="many"), "max_tokens"),
    (chat(min_tokens=5, max_tokens=2), "min_tokens"),
    (chat(logprobs=True, top_logprobs=6), "top_logprobs"),
    (chat(top_logprobs=2), "top_logprobs"),
    (chat(stop=[""]), "stop"),
    (chat(stop=5), "stop"),
    (chat(logit_bias={"1": 500}), "logit_bias"),
    (chat(logit_bias={"99999999": 1}), "logit_bias"),
    (chat(stop_token_ids=[-1]), "stop_token_ids"),
    (chat(seed="abc"), "seed"),
    (chat(stream="sometimes"), "stream"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "x"}}}]), "tools"),
    (chat(response_format={"type": "json_schema"}), "response_format"),
    (chat(functions=[{"name": "f"}]), "functions"),
    (chat(continue_final_message=True), "continue_final_message"),
    (chat(continue_final_message=True, add_generation_prompt=False), None),
    (chat(chat_template_kwargs={"tokenize": True}), "chat_template_kwargs"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT, ids=[str(i) for i in range(len(BAD_CHAT))])
def test_chat_invalid_fields(server: RemoteServer, body: dict[str, Any], param: str | None) -> None:
    check_error(httpx.post(server.url("/v1/chat/completions"), json=body), 400, param)
    check_still_serving(server)


BAD_COMPLETION = [
    (completion(prompt=[]), None),
    (completion(prompt=[1, 999999999]), "prompt"),
    (completion(prompt=[[1, 2], []]), None),
    (completion(prompt=[1, "a"]), None),
    (completion(logprobs=6), "logprobs"),
    (completion(suffix="!"), "suffix"),
    (completion(best_of=3), "best_of"),
    (completion(echo="loud"), "echo"),
    (completion(prompt=None), "prompt"),
    ({"model": MODEL}, "prompt"),
]


@pytest.mark.parametrize(
    "body,param", BAD_COMPLETION, ids=[str(i) for i in range(len(BAD_COMPLETION))]
)
def test_completion_invalid_fields(
    server: RemoteServer, body: dict[str, Any], param: str | None
) -> None:
    check_error(httpx.post(server.url("/v1/completions"), json=body), 400, param)
    check_still_serving(server)


VLLM_EXTRAS = [
    ("/v1/chat/completions", chat(use_beam_search=True), "use_beam_search"),
    ("/v1/chat/completions", chat(echo=True), "echo"),
    ("/v1/chat/completions", chat(chat_template="{{ messages }}"), "chat_template"),
    ("/v1/completions", completion(allowed_token_ids=[1, 2]), "allowed_token_ids"),
    ("/v1/completions", completion(bad_words=["the"]), "bad_words"),
    ("/v1/completions", completion(prompt_logprobs=1), "prompt_logprobs"),
    ("/v1/completions", completion(truncate_prompt_tokens=3), "truncate_prompt_tokens"),
    ("/v1/embeddings", {"model": MODEL, "input": "hi", "truncate_prompt_tokens": 3},
     "truncate_prompt_tokens"),
    ("/v1/embeddings", {"model": MODEL, "input": "hi", "normalize": False}, "normalize"),
]


@pytest.mark.parametrize("path,body,field", VLLM_EXTRAS, ids=[f for _, _, f in VLLM_EXTRAS])
def test_vllm_extras_we_do_not_implement_are_400s(
    server: RemoteServer, path: str, body: dict[str, Any], field: str
) -> None:
    """A vLLM client sending these expects a different output: refused, never ignored."""
    r = httpx.post(server.url(path), json=body)
    assert r.status_code == 400, r.text
    assert r.json() == {"error": {"message": f"{field} is not supported by this server",
                                  "type": "invalid_request_error", "param": field,
                                  "code": "unsupported_parameter"}}
    idle = {**body, field: {"use_beam_search": False, "echo": False, "normalize": True,
                            "bad_words": []}.get(field)}  # asks for nothing: served
    assert httpx.post(server.url(path), json=idle).status_code == 200


def test_context_length_exceeded(server: RemoteServer) -> None:
    long_prompt = "hello " * 300  # over 256 tokens
    error = check_error(
        httpx.post(server.url("/v1/completions"), json=completion(prompt=long_prompt)),
        400,
        "max_tokens",
        "context_length_exceeded",
    )
    n_prompt = len(
        httpx.post(server.url("/tokenize"), json={"prompt": long_prompt}).json()["tokens"]
    )
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]
    assert (
        f"requested {n_prompt + 2} tokens ({n_prompt} in the prompt, 2 in the completion)"
        in error["message"]
    )
    # A short prompt asking for more than fits.
    error = check_error(
        httpx.post(server.url("/v1/chat/completions"), json=chat(max_tokens=300)),
        400,
        "max_tokens",
        "context_length_exceeded",
    )
    assert "300 in the completion" in error["message"] and str(MAX_MODEL_LEN) in error["message"]
    # max_completion_tokens counts the same way.
    check_error(
        httpx.post(
            server.url("/v1/chat/completions"),
            json=chat(max_tokens=None, max_completion_tokens=1000),
        ),
        400,
        "max_tokens",
    )
    check_still_serving(server)


def test_unset_max_tokens_fills_the_context(server: RemoteServer) -> None:
    """No max_tokens: generation may run to the end of the context, never past it."""
    prompt = "hello " * 240
    n_prompt = len(httpx.post(server.url("/tokenize"), json={"prompt": prompt}).json()["tokens"])
    r = httpx.post(
        server.url("/v1/completions"),
        json={"model": MODEL, "prompt": prompt, "temperature": 0, "ignore_eos": True},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == MAX_MODEL_LEN - n_prompt
    assert body["choices"][0]["finish_reason"] == "length"


def test_unknown_model(server: RemoteServer) -> None:
    for path, body in (
        ("/v1/chat/completions", chat(model="gpt-4")),
        ("/v1/completions", completion(model="gpt-4")),
    ):
        error = check_error(
            httpx.post(server.url(path), json=body), 404, "model", "model_not_found"
        )
        assert "gpt-4" in error["message"]
    check_error(httpx.get(server.url("/v1/models/gpt-4")), 404, "model")
    check_still_serving(server)


def test_unparsable_json(server: RemoteServer) -> None:
    for raw in (b"{not json", b'{"model": "x", ', b"", b"[1, 2]", b"null"):
        r = httpx.post(
            server.url("/v1/chat/completions"),
            content=raw,
            headers={"Content-Type": "application/json"},
        )
        check_error(r, 400)
    check_still_serving(server)


def test_invalid_utf8(server: RemoteServer) -> None:
    r = httpx.post(
        server.url("/v1/completions"),
        content=b'{"prompt": "\xff\xfe"}',
        headers={"Content-Type": "application/json"},
    )
    check_error(r, 400)
    check_still_serving(server)


def test_wrong_content_type(server: RemoteServer) -> None:
    body = b'{"model": "%s", "prompt": "Hi"}' % MODEL.encode()
    for ctype in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ):
        r = httpx.post(server.url("/v1/completions"), content=body, headers={"Content-Type": ctype})
        error = check_error(r, 415, code="unsupported_media_type")
        assert "application/json" in error["message"]
    r = httpx.post(server.url("/v1/completions"), content=body, headers={"Content-Type": ""})
    check_error(r, 415)
    check_still_serving(server)


def test_body_too_large(server: RemoteServer) -> None:
    big = {"model": MODEL, "prompt": "x" * (MAX_BYTES + 10), "max_tokens": 1}
    check_error(httpx.post(server.url("/v1/completions"), json=big), 413, code="request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "%s", "prompt": "' % MODEL.encode()
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}'

    r = httpx.post(
        server.url("/v1/completions"),
        content=chunks(),
        headers={"Content-Type": "application/json"},
    )
    check_error(r, 413, code="request_too_large")
    check_still_serving(server)


def test_unknown_route_and_method(server: RemoteServer) -> None:
    check_error(httpx.get(server.url("/v1/nothing")), 404)
    check_error(httpx.get(server.url("/v1/chat/completions")), 405)
    check_error(httpx.post(server.url("/tokenize"), json={}), 400)
    check_error(httpx.post(server.url("/detokenize"), json={"tokens": [-4]}), 400)
    check_still_serving(server)


def test_ignored_fields_are_accepted(server: RemoteServer) -> None:
    body = chat(
        store=False,
        metadata={"a": "b"},
        service_tier="auto",
        parallel_tool_calls=True,
        tool_choice="none",
        response_format={"type": "text"},
        user="me",
        temperature=0,
    )
    r = httpx.post(server.url("/v1/chat/completions"), json=body)
    assert r.status_code == 200, r.text
    assert "ignoring request fields that have no meaning here" in server.log_text()


def test_error_shape_through_the_sdk(server: RemoteServer) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=9)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    # Streaming requests are validated before the stream starts: a plain 400, not an event.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, n=99, stream=True)
    check_still_serving(server)


def test_cors(server: RemoteServer) -> None:
    preflight = httpx.options(
        server.url("/v1/chat/completions"),
        headers={
            "Origin": "http://example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://example.com"
    r = httpx.get(server.url("/v1/models"), headers={"Origin": "http://example.com"})
    assert r.headers["access-control-allow-origin"] == "http://example.com"
    other = httpx.get(server.url("/v1/models"), headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    null = httpx.get(server.url("/v1/models"), headers={"Origin": "null"})
    assert not any(h.startswith("access-control-") for h in null.headers)
