"""Structured outputs without a model: specs, grammars, tool plans, tool-call parsers (streamed
and whole), request conversion, and the sampler's mask path on fixed logits."""

from __future__ import annotations

import math
import random

import msgspec
import pytest
import torch

from heron.engine.messages import AddRequests, ClientMessage, EngineRequest
from heron.engine.request import Request
from heron.engine.sampler import Sampler
from heron.engine.sampling_batch import GrammarMask, SamplingBatch, SamplingRow, unpack_bitmask
from heron.engine.structured import fill_bitmask
from heron.sampling_params import SamplingParams
from heron.server.inputs import Limits
from heron.server.pipeline import plan_tools
from heron.server.protocol import ChatCompletionRequest, CompletionRequest
from heron.structured import StructuredOutputsParams as S
from heron.structured.grammar import MAX_SAFE_INTEGER, SpecValidator, tighten_schema
from heron.structured.tool_parsers import (
    HermesParser,
    Llama3JsonParser,
    NamedParser,
    ParsedCall,
    ToolCallStream,
)
from heron.structured.tools import ToolCallFormat, ToolSpec, plan_tool_use

USER = [{"role": "user", "content": "hi"}]
WEATHER = ToolSpec.of("get_weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                      "required": ["city"]})
TIME = ToolSpec.of("get_time", None)
LIMITS = Limits(max_n=16, max_logprobs=20, vocab_size=1000)


# ---- the spec that crosses into the engine --------------------------------------------------------


def test_params_constructors_and_validation() -> None:
    assert S.json_object() == S("json", '{"type": "object"}')
    assert S.json_schema({"type": "string"}) == S("json", '{"type": "string"}')
    assert S.choice(["a", "b"]).spec == '["a", "b"]'
    with pytest.raises(ValueError, match="kind must be one of"):
        S("yaml", "x")
    with pytest.raises(ValueError, match="non-empty spec"):
        S.regex("")
    with pytest.raises(ValueError, match="non-empty list"):
        S.choice([])
    with pytest.raises(ValueError, match="structured_outputs must be"):
        SamplingParams(structured_outputs={"json": {}})  # type: ignore[arg-type]


def test_params_cross_zmq_inside_sampling_params() -> None:
    spec = S.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    request = EngineRequest(request_id="r", prompt_token_ids=[1],
                            sampling_params=SamplingParams(structured_outputs=spec))
    wire = msgspec.msgpack.encode(AddRequests(requests=[request]))
    decoded = msgspec.msgpack.Decoder(ClientMessage).decode(wire)
    assert decoded.requests[0].sampling_params.structured_outputs == spec
    assert SamplingParams(structured_outputs=spec).clone().structured_outputs == spec


# ---- grammars -------------------------------------------------------------------------------------


def test_tighten_schema_closes_objects_and_bounds_integers() -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "inner": {"type": "object", "properties": {}},
                       "open": {"type": "object", "properties": {}, "additionalProperties": True},
                       "list": {"type": "array", "items": {"type": "object",
                                                           "properties": {"x": {"type": "integer",
                                                                                "maximum": 3}}}}},
        "allOf": [{"properties": {"z": {"type": "string"}}}],
    }
    out = tighten_schema(schema)
    assert "additionalProperties" not in out  # its allOf may add properties
    assert "additionalProperties" not in out["allOf"][0]
    props = out["properties"]
    assert props["n"] == {"type": "integer", "minimum": -MAX_SAFE_INTEGER, "maximum": MAX_SAFE_INTEGER}
    assert props["inner"]["additionalProperties"] is False
    assert props["open"]["additionalProperties"] is True
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["list"]["items"]["properties"]["x"] == {"type": "integer", "maximum": 3}
    assert schema["properties"]["n"] == {"type": "integer"}, "the input is not modified"


@pytest.mark.parametrize("spec,message", [
    (S.json_schema({"type": "foo"}), "the JSON schema does not compile: Invalid type: foo"),
    (S("json", "{not json"), "not valid JSON"),
    (S("json", "[1, 2]"), "must be an object"),
    (S.regex("(("), "the regex does not compile"),
    (S.grammar("start: missing_rule"), "the grammar does not compile"),
    (S.json_schema({"$ref": "#/nowhere"}), "does not compile"),
])
def test_spec_validator_names_the_problem(spec: S, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpecValidator().check(spec)


@pytest.mark.parametrize("spec,message", [
    (S.regex(r"[^\s\S]"), "the regex accepts no output at all"),
    (S.json_schema({"$ref": "#"}), "the JSON schema accepts no output at all"),
    (S.grammar('start: "a" start'), "the grammar cannot be enforced: .*Too many items"),
    (S.grammar("start: " + " | ".join(f'"w{i}"' for i in range(3000))),
     "the grammar cannot be enforced: .*max is 2000"),
])
def test_spec_validator_refuses_what_cannot_be_enforced(spec: S, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        SpecValidator().check(spec)
    assert "<state>" not in str(info.value) and len(str(info.value)) <= 560


def test_large_choice_lists_are_one_lexeme_and_exact() -> None:
    from llguidance import LLMatcher

    from heron.structured.grammar import _byte_tokenizer, grammar_text

    choices = [f"w{i}x{i * 31 % 977}" for i in range(20_000)] + ["a|b", "(x)*", "\\d", "ünï\n"]
    spec = S.choice(choices)
    SpecValidator().check(spec)  # 2,000 rule alternatives overflow the parser; a lexeme does not
    text = grammar_text(spec)
    for choice in ("w19999x", "a|b", "(x)*", "\\d", "ünï\n", "w1x31"):
        matcher = LLMatcher(_byte_tokenizer(), text)
        fits = all(matcher.consume_token(b) for b in choice.encode())
        assert fits and matcher.is_accepting() == (choice in choices), choice
    matcher = LLMatcher(_byte_tokenizer(), text)
    assert not matcher.consume_token(ord("d")), "regex operators are literal"


def test_spec_validator_accepts_and_remembers() -> None:
    validator = SpecValidator(capacity=2)
    good = [S.json_object(), S.regex("[a-z]+"), S.choice(["x", "y"]),
            S.grammar('root ::= "yes" | "no"'), S.grammar('start: "a" | "b"')]
    for spec in good:
        validator.check(spec)
    assert validator.is_known(good[-1]) and validator.is_known(good[-2])
    assert not validator.is_known(good[0]), "an LRU of 2 forgot the oldest"


# ---- tool plans -----------------------------------------------------------------------------------


def test_plan_per_tool_choice() -> None:
    tools = [WEATHER, TIME]
    none = plan_tool_use(tools, "none", None, True, None, None)
    assert none.constraint is None and none.parser is None
    named = plan_tool_use(tools, None, "get_weather", True, None, None)
    assert named.constraint == WEATHER.parameters_constraint()
    assert isinstance(named.parser, NamedParser) and named.parser.name == "get_weather"
    required = plan_tool_use(tools, "required", None, False, None, None)
    assert required.constraint is not None and required.constraint.kind == "grammar"
    assert required.constraint.spec.startswith("start: calls\ncalls: call\n")
    assert isinstance(required.parser, HermesParser)
    auto = plan_tool_use(tools, None, None, True, None, None)
    assert auto.constraint is not None and "start: TEXT | calls" in auto.constraint.spec
    assert "calls: call+" in auto.constraint.spec
    own_format = plan_tool_use(tools, "auto", None, True, "llama3_json", None)
    assert own_format.constraint is None and isinstance(own_format.parser, Llama3JsonParser)
    with_json = plan_tool_use(tools, "auto", None, True, None, S.json_object())
    assert with_json.constraint is not None and "start: doc | calls" in with_json.constraint.spec
    no_tools = plan_tool_use([], None, None, True, None, S.regex("a+"))
    assert no_tools.constraint == S.regex("a+") and no_tools.parser is None


def test_tool_grammars_compile() -> None:
    validator = SpecValidator()
    for choice in ("required", "auto"):
        for parser in (None, "llama3_json"):
            for response in (None, S.json_schema({"type": "object", "properties": {}})):
                if choice == "required" and response is not None:
                    continue
                plan = plan_tool_use([WEATHER, TIME], choice, None, True, parser, response)
                if plan.constraint is not None:
                    validator.check(plan.constraint)


# What pydantic writes for nested models: local "$ref"s into the schema's own "$defs".
ORDER = ToolSpec.of("place_order", {
    "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
    "$defs": {"Item": {"type": "object", "required": ["name"],
                       "properties": {"name": {"type": "string", "default": {"$ref": "#/x"}},
                                      "parts": {"type": "array", "items": {"$ref": "#/$defs/Item"}}}}},
})
TREE = ToolSpec.of("tree", {"type": "object", "properties": {"child": {"$ref": "#"}}})


def test_tool_parameters_keep_their_refs_inside_a_call() -> None:
    validator = SpecValidator()
    for tools in ([ORDER], [ORDER, TREE, WEATHER]):
        for choice in ("required", "auto"):
            for parser in (None, "llama3_json"):
                plan = plan_tool_use(tools, choice, None, True, parser, None)
                if plan.constraint is not None:
                    validator.check(plan.constraint)  # a dangling "$ref" does not compile
    rules = ToolCallFormat("hermes").calls_rules([WEATHER, ORDER], True)
    assert '"$ref": "#/anyOf/1/properties/arguments/$defs/Item"' in rules
    assert '"default": {"$ref": "#/x"}' in rules  # data, not a schema: left as it is


@pytest.mark.parametrize("args,message", [
    (([], "required", None), "tool_choice needs tools"),
    (([], None, "f"), "tool_choice needs tools"),
    (([WEATHER], None, "nope"), "tool_choice names the function 'nope'"),
    (([WEATHER, WEATHER], None, None), "unique"),
    (([WEATHER], "sometimes", None), "tool_choice must be"),
])
def test_plan_errors(args: tuple, message: str) -> None:
    tools, choice, named = args
    with pytest.raises(ValueError, match=message):
        plan_tool_use(tools, choice, named, True, None, None)
    # A forced call is the turn's whole output: the response format waits for a later turn.
    forced = plan_tool_use([WEATHER], "required", None, True, None, S.json_object())
    assert forced.constraint == plan_tool_use([WEATHER], "required", None, True, None, None).constraint
    named = plan_tool_use([WEATHER], None, "get_weather", True, None, S.json_object())
    assert named.constraint == WEATHER.parameters_constraint()
    with pytest.raises(ValueError, match="function names"):
        ToolSpec.of("bad name!", None)


# ---- request conversion ---------------------------------------------------------------------------


@pytest.mark.parametrize("fields,expected", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, S.json_object()),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string"}, "strict": True}}}, S.json_schema({"type": "string"})),
    ({"structured_outputs": {"regex": "a+"}}, S.regex("a+")),
    ({"structured_outputs": {"choice": ["a", "b"]}}, S.choice(["a", "b"])),
    ({"structured_outputs": {"json": {"type": "integer"}}}, S.json_schema({"type": "integer"})),
    ({"structured_outputs": {"grammar": "start: \"a\""}}, S.grammar("start: \"a\"")),
    ({"structured_outputs": {"json_object": True}}, S.json_object()),
    ({"guided_json": {"type": "integer"}}, S.json_schema({"type": "integer"})),
    ({"guided_regex": "b+"}, S.regex("b+")),
    ({"guided_choice": ["x"]}, S.choice(["x"])),
    ({"guided_grammar": "root ::= \"x\""}, S.grammar("root ::= \"x\"")),
])
def test_output_constraint_from_each_field(fields: dict, expected: S | None) -> None:
    chat = ChatCompletionRequest.model_validate({"messages": USER, **fields})
    assert chat.output_constraint() == expected
    prepared = chat.to_spec(LIMITS)
    assert plan_tools(prepared, None).constraint == expected
    completion = CompletionRequest.model_validate({"prompt": "x", **fields}).to_spec(LIMITS)
    assert completion.constraint == (None if expected is None else (next(iter(fields)), expected))
    assert plan_tools(completion, None).constraint == expected


@pytest.mark.parametrize("fields,message", [
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice cannot be combined with guided_regex"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs cannot be combined with response_format"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs: set exactly one of"),
    ({"structured_outputs": {}}, "exactly one of json, regex, choice, grammar, json_object; got none"),
    ({"response_format": {"type": "json_schema"}}, "needs json_schema.schema"),
])
def test_output_constraint_errors(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChatCompletionRequest.model_validate({"messages": USER, **fields}).output_constraint()


def test_chat_request_tools_and_history() -> None:
    request = ChatCompletionRequest.model_validate({
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sun"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER.parameters}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    })
    request.check_messages()
    assert request.unsupported_fields() == [] and request.ignored_fields() == []
    assert [m.to_template_dict() for m in request.messages][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "sun", "tool_call_id": "call_1"},
    ]
    assert request.template_tools() == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER.parameters}}]
    plan = plan_tools(request.to_spec(LIMITS), None)
    assert plan.constraint == WEATHER.parameters_constraint()
    assert isinstance(plan.parser, NamedParser)


# ---- tool-call parsers ----------------------------------------------------------------------------


HERMES_TWO = ('Sure.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "n": [1, {"a": "}"}]}}'
              '</tool_call><tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


@pytest.mark.parametrize("parser,text,content,calls", [
    (HermesParser(), HERMES_TWO, "Sure.",
     [ParsedCall("get_weather", '{"city": "Rome", "n": [1, {"a": "}"}]}'), ParsedCall("get_time", "{}")]),
    (HermesParser(), "just text <b>", "just text <b>", []),
    (HermesParser(), "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    (HermesParser(), '<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>', "",
     [ParsedCall("f", '{"x": 1}')]),
    (HermesParser(), '<tool_call>{"name": "f"}</tool_call>', "", [ParsedCall("f", "")]),
    (Llama3JsonParser(), '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}', "",
     [ParsedCall("f", '{"a": 1}'), ParsedCall("g", "{}")]),
    (Llama3JsonParser(), '<|python_tag|>{"name": "f", "parameters": {"a": true}}', "",
     [ParsedCall("f", '{"a": true}')]),
    (Llama3JsonParser(), "The answer is 4.", "The answer is 4.", []),
    (Llama3JsonParser(), '{"answer": 4}', '{"answer": 4}', []),
    (NamedParser("f"), ' {"a": 1}\n', "", [ParsedCall("f", '{"a": 1}')]),
])
def test_parsers_whole_and_streamed(parser: object, text: str, content: str,
                                    calls: list[ParsedCall]) -> None:
    parsed = parser.parse(text, final=True)  # type: ignore[attr-defined]
    assert (parsed.content, parsed.calls) == (content, calls)
    # Streamed in random pieces, the deltas join to the same content and calls.
    for seed in range(5):
        rng = random.Random(seed)
        stream = ToolCallStream(parser)  # type: ignore[arg-type]
        got_content = ""
        got: dict[int, list[str]] = {}
        pos = 0
        while pos < len(text):
            step = rng.randint(1, 4)
            piece, pos = text[pos:pos + step], pos + step
            new_content, deltas = stream.feed(piece, final=pos >= len(text))
            got_content += new_content
            for d in deltas:
                if d.id is not None:
                    assert d.index == len(got) and d.name is not None
                    got[d.index] = [d.name, d.arguments]
                else:
                    got[d.index][1] += d.arguments
        assert got_content == content
        assert [ParsedCall(n, a) for n, a in got.values()] == calls
        assert len(set(stream.call_ids)) == len(calls)
        assert all(i.startswith("call_") for i in stream.call_ids)


def test_hermes_holds_back_a_possible_call_start() -> None:
    parser = HermesParser()
    assert parser.parse("Hello <tool_", final=False).content == "Hello"
    assert parser.parse("Hello <tool_", final=True).content == "Hello <tool_"
    assert parser.parse("Hello <b", final=False).content == "Hello <b"
    # A call cut short: its name is known, its arguments are as far as written.
    assert parser.parse('<tool_call>{"name": "f", "arguments": {"a": 12', final=True).calls == [
        ParsedCall("f", '{"a": 12')]


# ---- the sampler's mask path on fixed logits ------------------------------------------------------


def _int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


class FixedGrammar:
    """Allows a fixed set of token ids (filling the bitmask only calls fill_bitmask)."""

    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        words = [0] * bitmask.shape[1]
        for t in self.allowed:
            words[t // 32] |= 1 << (t % 32)
        bitmask[row] = torch.tensor([_int32(w) for w in words], dtype=torch.int32)


def _batch(rows: list[tuple[set[int] | None, dict[str, object]]], vocab: int) -> SamplingBatch:
    """Rows of (allowed tokens or None, sampling params), as the runner builds them: the
    constrained rows' bitmask filled by their grammars."""
    sampling = [SamplingRow(SamplingParams(**p), [1, 2], 2)  # type: ignore[arg-type]
                for _, p in rows]
    constrained = [i for i, (allowed, _) in enumerate(rows) if allowed is not None]
    grammars = [FixedGrammar(allowed) for allowed, _ in rows if allowed is not None]
    mask = GrammarMask(fill_bitmask(grammars, vocab), constrained)  # type: ignore[arg-type]
    return SamplingBatch.build(sampling, vocab, torch.device("cpu"), mask)


def test_unpack_bitmask_bit_order() -> None:
    bitmask = torch.tensor([[_int32(1 | 1 << 9 | 1 << 31), 1 << 4]], dtype=torch.int32)
    allowed = unpack_bitmask(bitmask, 40)
    assert allowed.shape == (1, 40)
    assert allowed[0].nonzero().flatten().tolist() == [0, 9, 31, 36]


def test_sampler_masks_constrained_rows_only() -> None:
    vocab = 70
    logits = torch.arange(vocab, dtype=torch.float32).repeat(3, 1)  # the best token is the last
    batch = _batch([(None, {"temperature": 0}), ({3, 40, 65}, {"temperature": 0}),
                    ({5}, {"temperature": 0, "logprobs": 1})], vocab)
    out = Sampler()(logits.clone(), batch)
    assert out.sampled_token_ids == [69, 65, 5], "greedy: argmax among the allowed tokens"
    # Logprobs are those of the raw distribution (OpenAI's definition), not of the masked one.
    expected = torch.log_softmax(logits[2], dim=-1)[5].item()
    assert out.logprobs[2] is not None and math.isclose(out.logprobs[2][5].logprob, expected,
                                                        rel_tol=1e-6)


def test_sampled_rows_never_draw_masked_tokens() -> None:
    vocab = 300
    torch.manual_seed(0)
    logits = torch.randn(4, vocab) * 3
    allowed = [{7, 8, 250}, set(range(100, 140)), {299}, None]
    params: dict[str, object] = {"temperature": 1.5, "top_p": 0.95, "presence_penalty": 0.5}
    batch = _batch([(a, params) for a in allowed], vocab)
    sampler = Sampler(seed=1)
    seen: list[set[int]] = [set() for _ in allowed]
    for _ in range(200):
        for i, token in enumerate(sampler(logits, batch).sampled_token_ids):
            seen[i].add(token)
    assert seen[0] == {7, 8, 250} or (seen[0] < {7, 8, 250} and len(seen[0]) == 2)
    assert seen[1] <= set(range(100, 140)) and len(seen[1]) > 5
    assert seen[2] == {299}
    assert len(seen[3] - set(range(100, 140)) - {7, 8, 250, 299}) > 10, "the free row is free"
    probs = sampler.compute_probs(logits, batch)
    for i, a in enumerate(allowed[:3]):
        outside = torch.ones(vocab, dtype=torch.bool)
        outside[list(a)] = False  # type: ignore[arg-type]
        assert probs[i][outside].sum().item() == 0.0


def test_scheduler_finishes_a_complete_grammar() -> None:
    from heron.config import CacheConfig, SchedulerConfig
    from heron.engine.request import RequestStatus
    from heron.engine.scheduler import Scheduler

    class Countdown:
        """Complete after ``left`` tokens."""

        def __init__(self, left: int) -> None:
            self.left = left
            self.seen: list[int] = []
            self.error: str | None = None

        def advance(self, token: int) -> bool:
            self.seen.append(token)
            self.left -= 1
            return self.left == 0

    scheduler = Scheduler(SchedulerConfig(), CacheConfig(block_size=4), 16, 32)
    req = Request("r", [1, 2, 3], SamplingParams(), max_tokens=10)
    grammar = Countdown(2)
    req.grammar = grammar  # type: ignore[assignment]
    scheduler.add_request(req)
    for token in (11, 12):
        out = scheduler.schedule()
        scheduler.update_from_output(out, {"r": token}, {})
    assert req.status == RequestStatus.FINISHED_STOPPED and req.stop_reason is None
    assert grammar.seen == [11, 12] and req.output_token_ids == [11, 12]
    assert not scheduler.has_unfinished_requests()


def test_a_failed_grammar_finishes_with_an_error_even_on_an_end_token() -> None:
    from heron.config import CacheConfig, SchedulerConfig
    from heron.engine.request import RequestStatus
    from heron.engine.scheduler import Scheduler

    class Broken:
        """Fails on its second token (as a parser limit would)."""

        def __init__(self) -> None:
            self.error: str | None = None
            self.count = 0

        def advance(self, token: int) -> bool:
            self.count += 1
            if self.count == 2:
                self.error = "the grammar constraint cannot be enforced: too many items"
                return True
            return False

    scheduler = Scheduler(SchedulerConfig(), CacheConfig(block_size=4), 16, 32)
    req = Request("r", [1, 2, 3], SamplingParams(), max_tokens=10)
    req.sampling_params.all_stop_token_ids = {2}
    req.grammar = Broken()  # type: ignore[assignment]
    scheduler.add_request(req)
    for token in (11, 2):  # the end token that a broken mask let through
        scheduler.update_from_output(scheduler.schedule(), {"r": token}, {})
    assert req.status == RequestStatus.FINISHED_ERROR and req.finish_reason == "error"
    assert req.stop_reason == "the grammar constraint cannot be enforced: too many items"
    assert not scheduler.has_unfinished_requests()


def test_json_text_of_tool_constraint_is_stable() -> None:
    """The same request gives the same spec text: the engine's grammar cache keys on it."""
    a = plan_tool_use([WEATHER, TIME], "required", None, True, None, None).constraint
    b = plan_tool_use([WEATHER, TIME], "required", None, True, None, None).constraint
    assert a == b and a is not None
    assert '"name": {"const": "get_weather"}' in a.spec and '"name": {"const": "get_time"}' in a.spec


@pytest.mark.parametrize("spec,message", [
    (S.regex("a" * 300 + "("),
     'the regex does not compile: at 1(8): invalid regex "' + "a" * 39 + "..." + "a" * 15
     + '(" (in regex): regex parse error: ' + "a" * 40 + "..." + "a" * 16
     + "( error: unclosed group"),
    (S.grammar("start: \"x\" | undefined_" + "z" * 300),
     'the grammar does not compile: at 1(8): unknown name: "undefined_' + "z" * 29 + "..."
     + "z" * 16 + '"'),
    (S.regex("(abc"), 'the regex does not compile: at 1(8): invalid regex "(abc" (in regex): '
                      "regex parse error: (abc error: unclosed group"),
    (S.grammar('start: foo\nfoo: "a" | bar'),
     'the grammar does not compile: at 2(6): unknown name: "bar"'),
])
def test_grammar_errors_keep_the_reason_after_a_long_quote(spec: S, message: str) -> None:
    """llguidance quotes the spec (twice, with carets under it); a long spec cut at 500
    characters hid the reason ('unclosed group') behind the quote. Long quotes are cut in the
    middle, the re-quoted source lines and carets dropped."""
    with pytest.raises(ValueError) as info:
        SpecValidator().check(spec)
    assert str(info.value) == message


def test_a_value_llguidance_cannot_read_is_cut_in_the_error() -> None:
    """llguidance's ValueError for a schema bound past 64 bits quotes the number: a 4000-digit
    bound (in a 4 MiB body, any length) came back whole in the 400 on /v1 and /api/chat."""
    with pytest.raises(ValueError) as info:
        SpecValidator().check(S.json_schema({"type": "integer", "maximum": int("9" * 4000)}))
    assert str(info.value) == "Value is not JSON serializable: " + "9" * 40 + "..." + "9" * 17


# ---- a thinking model: the reasoning first, then the constraint -----------------------------------

THINK, UNTHINK, THINK_EOS = 256, 257, 258  # a byte vocabulary plus Qwen3-like tag tokens


class _ThinkVocabulary:
    """What llguidance's ``TokenizerWrapper`` reads: the 256 bytes, ``<think>`` and
    ``</think>`` as special tokens (as in Qwen3's and DeepSeek-R1's vocabularies), an end."""

    eos_token_id = THINK_EOS
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b"<think>", b"</think>", b"</s>"]
    special_token_ids = [THINK, UNTHINK, THINK_EOS]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


def _think_tokenizer() -> object:
    from llguidance import LLTokenizer
    from llguidance._tokenizer import TokenizerWrapper

    return LLTokenizer(TokenizerWrapper(_ThinkVocabulary()), n_vocab=THINK_EOS + 1,
                       eos_token=THINK_EOS)


AB_SCHEMA = S.json_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                           "required": ["a"]})


def _walk(spec: S, pieces: list[str | int], tokens: bool) -> tuple[bool, bool]:
    """(every token fits, the output may end there): ``pieces`` are text (one token a byte) or
    tag token ids; ``tokens``: the vocabulary has the tag tokens (else the byte one, text tags)."""
    from llguidance import LLMatcher

    from heron.structured.grammar import _byte_tokenizer, grammar_text

    matcher = LLMatcher(_think_tokenizer() if tokens else _byte_tokenizer(),
                        grammar_text(spec, think_tokens=tokens))
    assert not matcher.is_error(), matcher.get_error()
    ids = [t for p in pieces for t in ([p] if isinstance(p, int) else list(p.encode()))]
    fits = all(matcher.consume_token(t) for t in ids)
    return fits, fits and matcher.is_accepting()


def _tags(tokens: bool) -> tuple[str | int, str | int]:
    return (THINK, UNTHINK) if tokens else ("<think>", "</think>")


@pytest.mark.parametrize("tokens", [True, False], ids=["tag-tokens", "text-tags"])
def test_think_first_reasoning_then_the_constraint(tokens: bool) -> None:
    """may_open: a reasoning block (any text, newlines, '<' included) may come first, then the
    JSON; the JSON alone still fits; JSON broken after the reasoning does not."""
    opening, closing = _tags(tokens)
    spec = S(AB_SCHEMA.kind, AB_SCHEMA.spec, think="may_open")
    assert _walk(spec, [opening, "any <b>text</b>\n{", closing, "\n\n", '{"a": 1}'],
                 tokens) == (True, True)
    assert _walk(spec, [opening, closing, '{"a": 1}'], tokens) == (True, True)
    assert _walk(spec, ['{"a": 1}'], tokens) == (True, True)
    assert _walk(spec, [opening, "x", closing, '{"a": "1"}'], tokens)[0] is False
    assert _walk(spec, [opening, "x", closing, "\n\n", "Sure: "], tokens)[0] is False
    assert _walk(spec, [opening, "x", closing, "\n\n\n\n\n"], tokens)[0] is False  # bounded gap
    assert _walk(spec, [opening, "x", closing, '{"a": 1}', opening], tokens)[0] is False


@pytest.mark.parametrize("tokens", [True, False], ids=["tag-tokens", "text-tags"])
def test_think_first_reasoning_ends_at_the_first_closing_tag(tokens: bool) -> None:
    """The reasoning parser ends the reasoning at the first "</think>" of the text: the grammar
    does too (with tag tokens, the tag spelled as text is not allowed inside)."""
    opening, closing = _tags(tokens)
    spec = S(AB_SCHEMA.kind, AB_SCHEMA.spec, think="may_open")
    if tokens:
        assert _walk(spec, [opening, "a </think>"], tokens)[0] is False
    else:  # the text "</think>" closes it: what follows is the answer
        assert _walk(spec, ["<think>a </think> b</think>"], tokens)[0] is False
        assert _walk(spec, ['<think>a </think>{"a": 2}'], tokens) == (True, True)


@pytest.mark.parametrize("tokens", [True, False], ids=["tag-tokens", "text-tags"])
def test_think_first_inside_an_opened_reasoning(tokens: bool) -> None:
    """opened (the prompt opened <think>): the output must close the reasoning before the
    answer; a repeated leading <think> is allowed (the parsers drop it)."""
    opening, closing = _tags(tokens)
    spec = S(AB_SCHEMA.kind, AB_SCHEMA.spec, think="opened")
    assert _walk(spec, ["plan it", closing, '\n{"a": 1}'], tokens) == (True, True)
    assert _walk(spec, [opening, "plan", closing, '{"a": 1}'], tokens) == (True, True)
    assert _walk(spec, ['{"a": 1}'], tokens) == (True, False)  # still the reasoning
    assert _walk(spec, ["plan", closing, '{"a": }'], tokens)[0] is False


@pytest.mark.parametrize("tokens", [True, False], ids=["tag-tokens", "text-tags"])
def test_no_reasoning_when_thinking_is_off(tokens: bool) -> None:
    """think "" (no parser, or the prompt closed the reasoning): the constraint from the first
    token, so a reasoning block is refused."""
    opening, closing = _tags(tokens)
    assert _walk(AB_SCHEMA, [opening, "x", closing, '{"a": 1}'], tokens)[0] is False
    assert _walk(AB_SCHEMA, ['{"a": 1}'], tokens) == (True, True)


def test_think_first_wraps_every_kind_of_constraint() -> None:
    """regex, choice, GBNF / Lark grammars and tool-call grammars all follow the reasoning."""
    tools = plan_tool_use([WEATHER, TIME], "required", None, True, None, None).constraint
    assert tools is not None
    call = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    cases = [(S.regex("a/b+"), "a/bb"), (S.choice(["yes", "no"]), "no"),
             (S.grammar('root ::= "on" | "off"'), "off"),
             (S.grammar('start: "n=" %json {"type": "integer"}'), "n=12"), (tools, call)]
    for spec, answer in cases:
        for tokens in (True, False):
            opening, closing = _tags(tokens)
            for mode, head in (("may_open", [opening]), ("opened", [])):
                wrapped = S(spec.kind, spec.spec, think=mode)
                assert _walk(wrapped, [*head, "hmm", closing, "\n\n", answer], tokens) == (
                    True, True), (spec.kind, mode, tokens)
                assert _walk(wrapped, [*head, "hmm", closing, "?" + answer], tokens)[0] is False


def test_the_engine_spells_the_tags_as_the_vocabulary_has_them() -> None:
    """The engine compiles with the tag tokens; a vocabulary without them (the byte one) gets
    the tags as text."""
    from heron.engine.structured import StructuredOutputManager
    from heron.structured.grammar import _byte_tokenizer

    spec = S(AB_SCHEMA.kind, AB_SCHEMA.spec, think="may_open")
    for tokenizer, output in ((_think_tokenizer(), [THINK, *b"x", UNTHINK, *b'{"a": 1}']),
                              (_byte_tokenizer(), list(b'<think>x</think>{"a": 1}'))):
        manager = StructuredOutputManager(lambda: None, THINK_EOS + 1, [THINK_EOS])
        manager._ll_tokenizer = tokenizer  # type: ignore[assignment]
        matcher = manager._compile(spec)
        assert all(matcher.consume_token(t) for t in output) and matcher.is_accepting()
