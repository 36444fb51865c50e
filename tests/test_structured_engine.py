"""Structured outputs through the whole engine on a tiny random Llama with a tiny byte-level BPE
tokenizer: whatever the (random) model prefers, every output fits its constraint; constrained
and free requests share steps; grammars survive preemption; bad specs are refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from heron import LLM, SamplingParams
from heron.engine.request import Request
from heron.engine.structured import StructuredOutputManager
from heron.structured import StructuredOutputsParams as S
from heron.tokenizer.tokenizer import GEMMA_CHAT_TEMPLATE, Tokenizer
from tests.tiny_models import VOCAB, save_tiny_model

CORPUS = ['hello world {"name": "bob", "age": 42, "ok": true} yes no maybe null 0123456789 '
          "abc-12 [1, 2] <tool_call></tool_call>"] * 20
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "maybe"]},
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["answer", "ok", "count", "tags"],
}


def byte_bpe_tokenizer() -> RawTokenizer:
    """A byte-level BPE (~300 ids: specials <pad> <s> </s>, 256 bytes, some merges)."""
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def hf_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=byte_bpe_tokenizer(), bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = save_tiny_model(tmp_path_factory.mktemp("llama"))
    hf_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), dtype="float32", kv_cache_memory="16MiB")


def _run(llm: LLM, spec: S | None, seeds: range, prompt: str = "hello", **params: object) -> list:
    """One sampled (temperature 1, seeded) output per seed."""
    fields: dict[str, object] = {"temperature": 1.0, "max_tokens": 64, **params}
    sampling = [SamplingParams(seed=s, structured_outputs=spec, **fields)  # type: ignore[arg-type]
                for s in seeds]
    return [o.outputs[0] for o in llm.generate([prompt] * len(sampling), sampling, use_tqdm=False)]


def test_choice_finishes_on_the_grammar_without_a_stop_token(llm: LLM) -> None:
    outs = _run(llm, S.choice(["yes", "no", "maybe"]), range(12))
    tokenizer = llm.get_tokenizer()
    assert {o.text for o in outs} <= {"yes", "no", "maybe"}
    assert len({o.text for o in outs}) > 1, "sampling still chooses among the choices"
    for o in outs:
        assert (o.finish_reason, o.stop_reason) == ("stop", None)
        assert tokenizer.decode(o.token_ids) == o.text, "no eos token was needed or added"


def test_logprobs_report_the_sampled_tokens(llm: LLM) -> None:
    """Each position's logprobs start with the token in the output (its own logprob and rank in
    the raw distribution), then the alternatives: at temperature 2, and where a choice forces
    tokens the raw distribution would rarely pick."""
    free = _run(llm, None, range(4), temperature=2.0, logprobs=2, max_tokens=12, ignore_eos=True)
    forced = _run(llm, S.choice(["zebra"]), range(2), logprobs=2)
    ranks = []
    for out in free + forced:
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        for token, entry in zip(out.token_ids, out.logprobs, strict=True):
            first, chosen = next(iter(entry.items()))
            assert first == token and chosen.rank is not None
            ranks.append(chosen.rank)
            assert len(entry) == 3 if chosen.rank > 2 else len(entry) == 2
    for out in forced:  # ASCII: each token's own string is its piece of the text
        words = [next(iter(entry.values())).decoded_token for entry in out.logprobs or []]
        assert "".join(w or "" for w in words) == out.text == "zebra"
    assert sum(r > 1 for r in ranks) > len(ranks) // 2, "most tokens here are not the argmax"


def test_regex_output_full_matches(llm: LLM) -> None:
    pattern = r"[a-c]{2,4}-[0-9]{2}"
    for o in _run(llm, S.regex(pattern), range(10)):
        assert re.fullmatch(pattern, o.text), o.text
        assert o.finish_reason == "stop"


def test_json_schema_output_validates(llm: LLM) -> None:
    outs = _run(llm, S.json_schema(SCHEMA), range(10), max_tokens=400)  # blanks: 1 token each
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len({o.text for o in outs}) > 3, "random documents, all valid"


def test_grammar_output_and_a_length_cut(llm: LLM) -> None:
    outs = _run(llm, S.grammar('root ::= "[" [0-9]+ ("," [0-9]+)* "]"'), range(6), max_tokens=200)
    for o in outs:
        assert re.fullmatch(r"\[[0-9]+(,[0-9]+)*\]", o.text), o.text
    cut = _run(llm, S.json_schema(SCHEMA), range(3), max_tokens=4)
    for o in cut:
        assert o.finish_reason == "length" and len(o.token_ids) == 4
        assert o.text.startswith("{")


def test_constrained_and_free_requests_share_steps(llm: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(["hello", "world"], free, use_tqdm=False)]
    mixed = llm.generate(
        ["hello", "abc", "world", "bob"],
        [free, SamplingParams(temperature=0, max_tokens=300, structured_outputs=S.json_schema(SCHEMA)),
         free, SamplingParams(temperature=0, max_tokens=12, structured_outputs=S.regex("[0-9]+"))],
        use_tqdm=False)
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMA)
    assert re.fullmatch("[0-9]+", mixed[3].outputs[0].text)


def test_grammar_state_survives_preemption(model_dir: Path, llm: LLM) -> None:
    prompts = [("hello world " * (3 + i)) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=100, structured_outputs=S.json_schema(SCHEMA))
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    small = LLM(str(model_dir), dtype="float32", num_gpu_blocks_override=14,
                enable_prefix_caching=False)
    got = [o.outputs[0].text for o in small.generate(prompts, params, use_tqdm=False)]
    assert small.engine.stats().num_preemptions > 0
    assert got == expected
    for text in got:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_spec_that_does_not_compile_is_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="the regex does not compile"):
        llm.generate("hello", SamplingParams(structured_outputs=S.regex("((")), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert _run(llm, S.choice(["ok"]), range(1))[0].text == "ok", "served right after"


def test_a_grammar_that_fails_mid_output_ends_with_an_error_not_a_stop(llm: LLM) -> None:
    """The offline LLM skips the API's up-front probe: the engine itself must not report the
    unconstrained text that follows a parser limit as a success."""
    for out in _run(llm, S.grammar('start: "a" start'), range(2), max_tokens=200):
        assert out.finish_reason == "error", (out.text, out.finish_reason)
        assert "cannot be enforced" in str(out.stop_reason)
        assert set(out.text) <= {"a"}
    for out in _run(llm, S.regex(r"[^\s\S]"), range(2)):
        assert out.finish_reason == "error" and out.text == ""


def test_thousands_of_choices_give_one_of_them(llm: LLM) -> None:
    choices = [f"w{i}x{i * 31 % 977}" for i in range(5000)]
    outs = _run(llm, S.choice(choices), range(6))
    assert all(o.text in set(choices) and o.finish_reason == "stop" for o in outs), [
        (o.text, o.finish_reason) for o in outs]


def test_manager_compiles_once_waits_and_evicts() -> None:
    manager = StructuredOutputManager(hf_tokenizer, VOCAB, [2], cache_size=1)

    def request(rid: str, spec: S) -> Request:
        return Request(rid, [1], SamplingParams(structured_outputs=spec), max_tokens=8)

    a, b, c = request("a", S.regex("x+")), request("b", S.regex("x+")), request("c", S.regex("y"))
    assert not manager.prepare(a) and not manager.prepare(b), "both wait for the one compile"
    assert manager.num_pending == 2
    ready: list[Request] = []
    while len(ready) < 2:
        got, failed = manager.collect(wait=True)
        ready += got
        assert not failed
    assert {r.request_id for r in ready} == {"a", "b"} and manager.num_pending == 0
    assert a.grammar is not None and b.grammar is not None and a.grammar.matcher is not b.grammar.matcher
    again = request("a2", S.regex("x+"))
    assert manager.prepare(again) and again.grammar is not None, "a cache hit: ready at once"
    assert not manager.prepare(c)
    assert [r.request_id for r in manager.abort(["c", "zzz"])] == ["c"]
    while manager.collect(wait=True) == ([], []) and manager._inflight:
        pass
    assert list(manager._cache) == [S.regex("y")], "an LRU of one keeps the newest"
    bad = request("bad", S.json_schema({"type": "foo"}))
    assert not manager.prepare(bad)
    failed: list = []
    while not failed:
        _, failed = manager.collect(wait=True)
    assert failed[0][0] is bad and "Invalid type: foo" in failed[0][1]
    manager.shutdown()


def test_manager_index_from_json_starts_its_encoder_on_the_first_compile(tmp_path: Path) -> None:
    """The index built at start holds no tokenizer; the first compile starts the process that
    does (the matcher encodes a grammar's forced text with it) before the request is handed
    over; shutting the manager down stops it."""
    path = tmp_path / "tokenizer.json"
    byte_bpe_tokenizer().save(str(path))
    manager = StructuredOutputManager(hf_tokenizer, VOCAB, [2], tokenizer_json=lambda: path)
    manager.build_index()
    vocabulary = manager._vocabulary
    assert vocabulary is not None and vocabulary.encoder.pid is None
    request = Request("a", [1], SamplingParams(structured_outputs=S.json_schema(SCHEMA)),
                      max_tokens=8)
    assert not manager.prepare(request)
    ready: list[Request] = []
    while not ready:
        ready, failed = manager.collect(wait=True)
        assert not failed
    assert vocabulary.encoder.pid is not None and manager._vocabulary is vocabulary
    assert request.grammar is not None
    text = '{"answer": "yes", "ok": true, "count": 7, "tags": ["a"]}'
    assert all(request.grammar.matcher.consume_token(t) for t in hf_tokenizer().encode(text))
    assert request.grammar.matcher.is_accepting()
    manager.shutdown()
    assert vocabulary.encoder.pid is None


def test_tools_render_in_the_gemma_template() -> None:
    tokenizer = Tokenizer(hf_tokenizer(), chat_template=GEMMA_CHAT_TEMPLATE)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Rome and Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            {"id": "2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "sun"},
        {"role": "tool", "tool_call_id": "2", "content": "snow"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert tokenizer.apply_chat_template(messages, tools=tools) == (
        "<s><start_of_turn>user\nBe brief.\n\nYou can call these tools:\n"
        '{"name": "get_weather", "parameters": {"type": "object"}}\n'
        'To call a tool, answer with <tool_call>{"name": <tool name>, "arguments": '
        "<arguments as a JSON object>}</tool_call>, one block per call.\n\n"
        "Weather in Rome and Oslo?<end_of_turn>\n"
        '<start_of_turn>model\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}'
        '</tool_call><tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
        "<end_of_turn>\n"
        "<start_of_turn>user\n<tool_response>sun</tool_response>\n<tool_response>snow</tool_response>"
        "<end_of_turn>\n<start_of_turn>model\n")
    # Without tools the template renders exactly as before.
    assert tokenizer.apply_chat_template(messages[:2]) == (
        "<s><start_of_turn>user\nBe brief.\n\nWeather in Rome and Oslo?<end_of_turn>\n"
        "<start_of_turn>model\n")


