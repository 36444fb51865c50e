"""Unit tests of the server's pieces that need no model: request conversion, error mapping,
the wire messages, the core's busy loop, metrics and the CLI."""

from __future__ import annotations

import os
import threading
import time

import msgspec
import pytest
import zmq

from heron.cli import build_parser, engine_config_from_args, server_config_from_args
from heron.engine.core_proc import CoreLoop
from heron.engine.messages import (
    AbortRequests,
    AddRequests,
    ClientMessage,
    CoreMessage,
    CoreOutputs,
    EngineInfo,
    EngineOutput,
    EngineRequest,
    EngineStats,
    RequestRejected,
    ShutdownCore,
    TokenLogprobs,
)
from heron.sampling_params import SamplingParams
from heron.server.app import validation_error
from heron.server.config import ServerConfig
from heron.server.metrics import StatsLogger
from heron.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    param_of,
    parse_part,
)
from heron.server.serving import top_logprobs

USER = [{"role": "user", "content": "hi"}]


# ---- requests convert themselves ------------------------------------------------------------------


def test_chat_request_to_sampling_params_maps_every_field() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "messages": USER,
            "temperature": 0.7,
            "top_p": 0.9,
            "n": 3,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "seed": 42,
            "stop": "END",
            "logprobs": True,
            "top_logprobs": 4,
            "logit_bias": {"17": -5},
            "top_k": 40,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "min_tokens": 2,
            "ignore_eos": True,
            "stop_token_ids": [7],
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "include_stop_str_in_output": True,
        }
    )
    params = req.to_sampling_params(max_tokens=10, max_logprobs=20)
    assert params == SamplingParams(
        n=3,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=42,
        stop=["END"],
        stop_token_ids=[7],
        ignore_eos=True,
        max_tokens=10,
        min_tokens=2,
        logprobs=4,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        include_stop_str_in_output=True,
        logit_bias={17: -5.0},
    )


def test_chat_defaults_and_max_completion_tokens() -> None:
    req = ChatCompletionRequest.model_validate({"messages": USER, "max_completion_tokens": 7})
    assert req.requested_max_tokens() == 7
    older = ChatCompletionRequest.model_validate({"messages": USER, "max_tokens": 5})
    assert older.requested_max_tokens() == 5
    both = ChatCompletionRequest.model_validate(
        {"messages": USER, "max_tokens": 5, "max_completion_tokens": 7}
    )
    with pytest.raises(ValueError, match="^max_tokens: setting 'max_tokens' and "
                                         "'max_completion_tokens' at the same time"):
        both.requested_max_tokens()
    params = req.to_sampling_params(None, 20)
    assert params.max_tokens is None and params.n == 1 and params.temperature == 1.0
    assert params.logprobs is None and params.stop == []
    assert req.to_sampling_params(3, 20).max_tokens == 3


def test_chat_logprobs_rules() -> None:
    assert (
        ChatCompletionRequest.model_validate({"messages": USER, "logprobs": True})
        .to_sampling_params(1, 20)
        .logprobs
        == 0
    )
    with pytest.raises(ValueError, match="top_logprobs needs logprobs"):
        ChatCompletionRequest.model_validate(
            {"messages": USER, "top_logprobs": 2}
        ).to_sampling_params(1, 20)
    with pytest.raises(ValueError, match=r"top_logprobs must be an integer in \[0, 5\]"):
        ChatCompletionRequest.model_validate(
            {"messages": USER, "logprobs": True, "top_logprobs": 6}
        ).to_sampling_params(1, 5)


def test_completion_echo_asks_for_prompt_logprobs() -> None:
    req = CompletionRequest.model_validate({"prompt": "x", "echo": True, "logprobs": 3})
    params = req.to_sampling_params(4, 20)
    assert (params.logprobs, params.prompt_logprobs, params.max_tokens) == (3, 3, 4)
    plain = CompletionRequest.model_validate({"prompt": "x", "logprobs": 3}).to_sampling_params(
        4, 20
    )
    assert plain.prompt_logprobs is None


@pytest.mark.parametrize("prompt", ["a", ["a", "b"], [1, 2], [[1], [2, 3]]])
def test_completion_prompt_forms(prompt: object) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt


def test_limits_and_vocabulary() -> None:
    req = ChatCompletionRequest.model_validate({"messages": USER, "n": 5})
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 4\]"):
        req.check_limits(max_n=4, max_logprobs=20, vocab_size=100)
    req = ChatCompletionRequest.model_validate({"messages": USER, "logit_bias": {"100": 1}})
    with pytest.raises(ValueError, match="logit_bias names token id 100"):
        req.check_limits(max_n=4, max_logprobs=20, vocab_size=100)
    req = ChatCompletionRequest.model_validate({"messages": USER, "stop_token_ids": [99]})
    req.check_limits(max_n=4, max_logprobs=20, vocab_size=100)


def test_messages_to_template_dicts() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    "name": "ann",
                },
                {"role": "assistant", "content": None, "tool_calls": []},
            ]
        }
    )
    req.check_messages()
    assert [m.to_template_dict() for m in req.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb", "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": []},
    ]


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"messages": []}, "at least one message"),
        ({"messages": [{"role": "user"}]}, "content is required"),
        ({"messages": USER, "continue_final_message": True}, "add_generation_prompt set to false"),
        (
            {"messages": USER, "continue_final_message": True, "add_generation_prompt": False},
            "last message to be an assistant",
        ),
        ({"messages": USER, "chat_template_kwargs": {"tokenize": True}}, "may not set tokenize"),
    ],
)
def test_check_messages_errors(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ChatCompletionRequest.model_validate(fields).check_messages()


def test_unsupported_and_ignored_fields() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "messages": USER,
            "tools": [],
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "store": True,
            "metadata": {},
        }
    )
    assert req.unsupported_fields() == [] == req.unknown_fields()
    assert req.ignored_fields() == ["metadata", "store"]
    # Known to OpenAI's API but not to heron: refused or ignored; unknown to both: refused.
    req = ChatCompletionRequest.model_validate(
        {"messages": USER, "web_search_options": {}, "prompt_cache_options": {}, "temprature": 0})
    assert req.unsupported_fields() == ["web_search_options"]
    assert req.ignored_fields() == ["prompt_cache_options"]
    assert req.unknown_fields() == ["temprature"]
    req = ChatCompletionRequest.model_validate(
        {
            "messages": USER,
            "functions": [{"name": "f"}],
            "function_call": "f",
            "response_format": {"type": "json_object"},
        }
    )
    assert req.unsupported_fields() == ["function_call", "functions"]
    assert CompletionRequest.model_validate({"prompt": "x", "best_of": 2}).unsupported_fields() == [
        "best_of"
    ]
    # vLLM extras heron does not implement: refused unless they ask for nothing.
    vllm = {"use_beam_search": True, "allowed_token_ids": [1], "bad_words": ["x"],
            "prompt_logprobs": 1, "truncate_prompt_tokens": 5}
    for model, prompt in ((ChatCompletionRequest, {"messages": USER}),
                          (CompletionRequest, {"prompt": "x"})):
        assert model.model_validate({**prompt, **vllm}).unsupported_fields() == sorted(vllm)
        idle = model.model_validate({**prompt, "use_beam_search": False, "bad_words": []})
        assert idle.unsupported_fields() == idle.ignored_fields() == []
    assert ChatCompletionRequest.model_validate(
        {"messages": USER, "echo": True, "chat_template": "{{ x }}"}
    ).unsupported_fields() == ["chat_template", "echo"]


# ---- errors ---------------------------------------------------------------------------------------


def test_validation_error_prefers_our_messages_and_strips_union_labels() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
        )
    error = validation_error([{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()])
    assert error.status_code == 400
    assert error.error.param == "messages[0].content[0].type"
    assert "content parts of type 'image_url' are not supported" in error.error.message
    assert error.model_dump() == {
        "error": {
            "message": error.error.message,
            "type": "invalid_request_error",
            "param": "messages[0].content[0].type",
            "code": None,
        }
    }


def _validation_error_of(model: type, body: dict, dotted: bool = False) -> tuple[str | None, str]:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    error = validation_error(errors, dotted).error
    return error.param, error.message


USER_TURNS = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


@pytest.mark.parametrize("body,param,message", [
    # A union's members each fail; the error names the place, OpenAI's way, both alternatives.
    ({"messages": [*USER_TURNS, {"role": "user", "content": 5}]}, "messages[2].content",
     "messages[2].content: Input should be a valid string or a valid list"),
    # The member the input meant (a list of parts) goes deepest: its error wins.
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text", "messages[0].content[0].text: Input should be a valid string"),
    ({"messages": USER_TURNS, "stop": ["x", 1]}, "stop[1]",
     "stop[1]: Input should be a valid string"),
    # A model's class name (the union member NamedToolChoice) never shows.
    ({"messages": USER_TURNS, "tool_choice": {"type": "function", "function": {}}},
     "tool_choice.function.name", "tool_choice.function.name: Field required"),
    ({"messages": USER_TURNS, "tool_choice": 3}, "tool_choice",
     "tool_choice: Input should be 'none', 'auto' or 'required' or a valid dictionary"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [
        {"id": "a", "function": {"name": "f"}}]}]}, "messages[0].tool_calls[0].function.arguments",
     "messages[0].tool_calls[0].function.arguments: Field required"),
])
def test_validation_error_names_the_deepest_field_openai_style(
    body: dict, param: str, message: str
) -> None:
    assert _validation_error_of(ChatCompletionRequest, body) == (param, message)


def test_validation_error_paths_of_prompts_and_anthropic_bodies() -> None:
    from heron.server.protocol_anthropic import MessagesRequest

    assert _validation_error_of(CompletionRequest, {"prompt": [[1, "a"]]}) == (
        "prompt[0][1]", "prompt[0][1]: Input should be a valid integer")
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": 5}]}
    assert _validation_error_of(MessagesRequest, body, dotted=True) == (
        "messages.0.content", "messages.0.content: Input should be a valid string or a valid list")


def test_parse_part_paths_have_no_type_labels() -> None:
    from heron.server.protocol_anthropic import ToolResultBlock
    from heron.server.protocol_responses import ResponsesRequest

    request = ResponsesRequest.model_validate({"input": [{"role": "user", "content": 5}]})
    with pytest.raises(ValueError) as info:
        request.input_messages()
    assert str(info.value) == "input[0].content: Input should be a valid string or a valid list"
    with pytest.raises(ValueError) as info:
        parse_part(ToolResultBlock, {"type": "tool_result", "tool_use_id": "t",
                                     "content": [{"type": "image"}]}, "messages.0.content.0",
                   dotted=True)
    assert str(info.value) == "messages.0.content.0.content.0.type: Input should be 'text'"


def test_validation_error_json() -> None:
    error = validation_error(
        [
            {
                "type": "json_invalid",
                "loc": ("body", 3),
                "msg": "JSON decode error",
                "ctx": {"error": "Expecting value"},
            }
        ]
    )
    assert (error.status_code, error.error.code) == (400, "invalid_json")
    assert error.error.message == "the request body is not valid JSON: Expecting value"


def test_param_of() -> None:
    assert param_of("temperature must be in [0, 2], got 3") == "temperature"
    assert param_of("messages[0].content is required") == "messages[0].content"
    assert param_of("input[2].content[0]: content parts of type 'x'") == "input[2].content[0]"
    assert param_of("tools.0.type: 'x' is not supported") == "tools.0.type"
    assert param_of("tools[0]type is wrong") is None
    # With the request's fields: a message that starts with another word names no field.
    assert param_of("the prompt is empty", {"prompt"}) is None
    assert param_of("prompt must not be empty", {"prompt"}) == "prompt"


# ---- wire messages --------------------------------------------------------------------------------


def test_client_messages_roundtrip_without_pickle() -> None:
    params = SamplingParams(
        temperature=0.5, seed=3, stop=["x"], logit_bias={5: 1.5}, max_tokens=None
    )
    params.all_stop_token_ids = {1, 2}
    add = AddRequests(
        requests=[
            EngineRequest(
                request_id="r-0",
                prompt_token_ids=[1, 2, 3],
                sampling_params=params,
                arrival_time=1.5,
            )
        ]
    )
    decoder = msgspec.msgpack.Decoder(ClientMessage)
    back = decoder.decode(msgspec.msgpack.encode(add))
    assert back == add and back.requests[0].sampling_params.logit_bias == {5: 1.5}
    for message in (AbortRequests(request_ids=["a", "b"]), ShutdownCore()):
        assert decoder.decode(msgspec.msgpack.encode(message)) == message


def test_core_messages_roundtrip() -> None:
    out = CoreOutputs(
        outputs=[
            EngineOutput(
                request_id="r",
                new_token_ids=[9],
                finish_reason="length",
                new_logprobs=[TokenLogprobs(token_ids=[9, 4], logprobs=[-0.1, -2.0], ranks=[1, 2])],
                prompt_logprobs=[None, TokenLogprobs(token_ids=[3], logprobs=[-1.0], ranks=[5])],
            )
        ],
        stats=EngineStats(num_running=1),
    )
    decoder = msgspec.msgpack.Decoder(CoreMessage)
    assert decoder.decode(msgspec.msgpack.encode(out)) == out
    rejected = RequestRejected(request_id="r", message="too long")
    assert decoder.decode(msgspec.msgpack.encode(rejected)) == rejected


def test_top_logprobs_orders_and_dedupes() -> None:
    entry = TokenLogprobs(
        token_ids=[7, 3, 7, 5], logprobs=[-1.5, -0.2, -1.5, -3.0], ranks=[2, 1, 2, 3]
    )
    assert top_logprobs(entry, 2) == [(3, -0.2), (7, -1.5)]
    assert top_logprobs(entry, 0) == []


# ---- the core's busy loop, with a scripted core ---------------------------------------------------


class ScriptedCore:
    """Emits one token per step (the step index) for each request until max_tokens."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.generated: dict[str, int] = {}

    def add_request(self, request: EngineRequest) -> None:
        if not request.prompt_token_ids:
            raise ValueError("the prompt is empty")
        self.requests[request.request_id] = request.sampling_params.max_tokens or 10**9
        self.generated[request.request_id] = 0

    def abort_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.requests.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def pop_rejected(self) -> list:
        return []  # requests refused after add_request (grammars that failed to compile): none

    def step(self) -> list[EngineOutput]:
        time.sleep(0.002)
        outs = []
        for rid, limit in list(self.requests.items()):
            self.generated[rid] += 1
            done = self.generated[rid] >= limit
            outs.append(
                EngineOutput(
                    request_id=rid,
                    new_token_ids=[self.generated[rid]],
                    finish_reason="length" if done else None,
                )
            )
            if done:
                del self.requests[rid]
        return outs

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.requests), generation_tokens_total=sum(self.generated.values())
        )


def test_core_loop_serves_aborts_reports_and_stops() -> None:
    ctx = zmq.Context()
    to_core, core_in = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    core_out, from_core = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    core_in.bind("inproc://in")
    to_core.connect("inproc://in")
    from_core.bind("inproc://out")
    core_out.connect("inproc://out")
    loop = CoreLoop(ScriptedCore(), core_in, core_out, parent_pid=os.getppid())  # type: ignore[arg-type]
    thread = threading.Thread(target=loop.run)
    thread.start()
    decoder = msgspec.msgpack.Decoder(CoreMessage)

    def send(message: object) -> None:
        to_core.send(msgspec.msgpack.encode(message))

    def receive_until(predicate, timeout_s: float = 5.0) -> list:  # noqa: ANN001
        got, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if from_core.poll(100):
                got.append(decoder.decode(from_core.recv()))
                if predicate(got[-1]):
                    return got
        raise AssertionError(f"timed out; got {got}")

    try:
        params = SamplingParams(max_tokens=3)
        send(
            AddRequests(
                requests=[
                    EngineRequest(request_id="short", prompt_token_ids=[1], sampling_params=params),
                    EngineRequest(
                        request_id="long",
                        prompt_token_ids=[1],
                        sampling_params=SamplingParams(max_tokens=None),
                    ),
                    EngineRequest(request_id="empty", prompt_token_ids=[], sampling_params=params),
                ]
            )
        )
        got = receive_until(
            lambda m: (
                isinstance(m, CoreOutputs)
                and any(o.request_id == "short" and o.finished for o in m.outputs)
            )
        )
        assert RequestRejected(request_id="empty", message="the prompt is empty") in got
        short = [
            o.new_token_ids[0]
            for m in got
            if isinstance(m, CoreOutputs)
            for o in m.outputs
            if o.request_id == "short"
        ]
        assert short == [1, 2, 3]
        send(AbortRequests(request_ids=["long"]))
        # Once idle, the loop reports fresh stats: nothing running.
        receive_until(
            lambda m: (
                isinstance(m, CoreOutputs)
                and not m.outputs
                and m.stats is not None
                and m.stats.num_running == 0
            )
        )
        send(ShutdownCore())
        thread.join(5)
        assert not thread.is_alive()
    finally:
        for sock in (to_core, core_in, core_out, from_core):
            sock.close(linger=0)
        ctx.term()


# ---- metrics and the stats line -------------------------------------------------------------------


class _Engine:
    def __init__(self) -> None:
        self.stats = EngineStats()
        self.num_in_flight = 0


def test_stats_logger_line_only_while_busy() -> None:
    engine = _Engine()
    stats = StatsLogger(engine)  # type: ignore[arg-type]
    assert stats.tick() is None
    engine.stats = EngineStats(
        num_running=2,
        num_waiting=1,
        kv_cache_usage=0.25,
        prompt_tokens_total=100,
        generation_tokens_total=50,
    )
    line = stats.tick()
    assert line is not None and line.startswith("running: 2, waiting: 1, KV cache: 25.0%, prompt: ")
    engine.stats = EngineStats(prompt_tokens_total=100, generation_tokens_total=50)
    assert stats.tick() is None


def test_metrics_render() -> None:
    from heron.server.metrics import ServerMetrics

    engine = _Engine()
    engine.stats = EngineStats(
        num_running=3,
        kv_cache_usage=0.5,
        prompt_tokens_total=7,
        prefix_cache_queries=10,
        prefix_cache_hits=4,
    )
    metrics = ServerMetrics(engine, "m")  # type: ignore[arg-type]
    metrics.observe_first_token(0.03)
    metrics.observe_finished("length", 1.0, 5, 2)
    text = metrics.render().decode()
    assert 'heron:num_requests_running{model_name="m"} 3.0' in text
    assert 'heron:kv_cache_usage_perc{model_name="m"} 0.5' in text
    assert 'heron:prompt_tokens_total{model_name="m"} 7.0' in text
    assert 'heron:prefix_cache_hits_total{model_name="m"} 4.0' in text
    assert 'heron:time_to_first_token_seconds_count{model_name="m"} 1.0' in text
    assert 'heron:request_success_total{finished_reason="length",model_name="m"} 1.0' in text
    # Two servers in one process do not share a registry.
    assert ServerMetrics(engine, "m").render().count(b"time_to_first_token_seconds_count") == 1


# ---- CLI and config -------------------------------------------------------------------------------


def test_serve_flags_build_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERON_API_KEY", "from-env")
    args = build_parser().parse_args(
        [
            "serve",
            "model.gguf",
            "--host",
            "0.0.0.0",
            "--port",
            "9000",
            "--served-model-name",
            "a",
            "b",
            "--max-model-len",
            "1024",
            "--dtype",
            "bfloat16",
            "--device",
            "cpu",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "512",
            "--kv-cache-memory",
            "1GiB",
            "--block-size",
            "32",
            "--no-enable-prefix-caching",
            "--chat-template",
            "t.jinja",
            "--seed",
            "7",
            "--allowed-origins",
            '["http://x", "http://y"]',
            "--max-request-bytes",
            "1MiB",
            "--max-n",
            "4",
            "--max-logprobs",
            "5",
            "--allowed-hosts",
            "api.internal",
            "api2.internal",
            "--max-seqs-per-request",
            "64",
            "--grammar-index",
            "first-use",
        ]
    )
    engine = engine_config_from_args(args)
    assert engine.model.grammar_index == "first-use"
    assert (
        engine.model.model,
        engine.model.max_model_len,
        engine.model.dtype,
        engine.model.device,
        engine.model.seed,
        engine.model.chat_template,
    ) == ("model.gguf", 1024, "bfloat16", "cpu", 7, "t.jinja")
    assert (
        engine.cache.block_size,
        engine.cache.kv_cache_memory,
        engine.cache.enable_prefix_caching,
    ) == (32, 1 << 30, False)
    assert (engine.scheduler.max_num_seqs, engine.scheduler.max_num_batched_tokens) == (8, 512)
    server = server_config_from_args(args)
    assert server == ServerConfig(
        host="0.0.0.0",
        port=9000,
        api_key="from-env",
        served_model_names=("a", "b"),
        allowed_origins=("http://x", "http://y"),
        max_request_bytes=1 << 20,
        max_n=4,
        max_logprobs=5,
        allowed_hosts=("api.internal", "api2.internal"),
        max_seqs_per_request=64,
    )


def test_serve_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    server = server_config_from_args(args)
    assert (server.host, server.port, server.served_model_names, server.max_n) == (
        "127.0.0.1",
        8000,
        (),
        16,
    )
    assert engine_config_from_args(args).model.model is None
    assert engine_config_from_args(args).model.grammar_index == "start"
    assert (server.allowed_hosts, server.max_seqs_per_request) == ((), 256)
    assert server.pooling == "mean"
    last = build_parser().parse_args(["serve", "--pooling", "last"])
    assert server_config_from_args(last).pooling == "last"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--pooling", "cls"])


def test_serve_help_lists_the_vllm_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--api-key",
        "--served-model-name",
        "--max-model-len",
        "--dtype",
        "--device",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--kv-cache-memory",
        "--block-size",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
        "--chat-template",
        "--seed",
        "--allowed-origins",
        "--max-request-bytes",
        "--max-n",
        "--max-logprobs",
    ):
        assert flag in text, flag


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"port": 70000}, "port"),
        ({"api_key": ""}, "api_key"),
        ({"max_n": 0}, "max_n"),
        ({"max_logprobs": 21}, "max_logprobs"),
        ({"max_request_bytes": 10}, "max_request_bytes"),
        ({"pooling": "cls"}, "pooling"),
    ],
)
def test_server_config_validation(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServerConfig(**fields)


def test_engine_info_is_what_the_core_reports() -> None:
    info = EngineInfo(
        max_model_len=8,
        vocab_size=16,
        num_kv_blocks=4,
        block_size=2,
        device="cpu",
        dtype="float32",
        eos_token_ids=[1],
    )
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(info), type=EngineInfo) == info
