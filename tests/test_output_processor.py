"""The output processor without an engine: scripted EngineOutputs through ``RequestState`` and
``OutputProcessor`` with the character tokenizer (one token per character)."""

from __future__ import annotations

import pytest

from heron.engine.messages import EngineOutput, TokenLogprobs
from heron.output_processor import ChoiceDelta, OutputProcessor, Prompt, RequestState
from heron.sampling_params import SamplingParams
from heron.tokenizer.tokenizer import Tokenizer
from tests.fake_engine import EOS, char_id, char_tokenizer_for_serving


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return char_tokenizer_for_serving()


def ids(text: str) -> list[int]:
    return [char_id(c) for c in text]


def out(rid: str, text: str | list[int], finish: str | None = None,
        stop_reason: int | str | None = None, logprobs: list[float] | None = None) -> EngineOutput:
    new = ids(text) if isinstance(text, str) else text
    entries = None if logprobs is None else [
        TokenLogprobs(token_ids=[t], logprobs=[lp], ranks=[1]) for t, lp in zip(new, logprobs)]
    return EngineOutput(request_id=rid, new_token_ids=new, new_logprobs=entries,
                        finish_reason=finish, stop_reason=stop_reason)


def run(state: RequestState, outputs: list[EngineOutput]) -> list[ChoiceDelta | None]:
    return [state.process(o) for o in outputs]


def one(tokenizer: Tokenizer, **params: object) -> RequestState:
    return RequestState("r", [Prompt(ids("Hi"), "Hi")], SamplingParams(**params), tokenizer)


def test_fan_out_n_per_prompt_with_seed_plus_i(tokenizer: Tokenizer) -> None:
    params = SamplingParams(n=3, seed=5, max_tokens=4)
    state = RequestState("r", [Prompt([1, 5], "a"), Prompt([1, 6, 7], "b")], params, tokenizer, 9.0)
    assert [r.request_id for r in state.requests] == [f"r-{p}-{i}" for p in (0, 1) for i in (0, 1, 2)]
    assert [r.sampling_params.seed for r in state.requests] == [5, 6, 7, 5, 6, 7]
    assert {r.sampling_params.n for r in state.requests} == {1}
    assert [r.prompt_token_ids for r in state.requests] == [[1, 5]] * 3 + [[1, 6, 7]] * 3
    assert {r.arrival_time for r in state.requests} == {9.0}
    assert [c.index for c in state.choices.values()] == [0, 1, 2, 3, 4, 5]
    unseeded = RequestState("u", [Prompt([1], "")], SamplingParams(n=2), tokenizer)
    assert [r.sampling_params.seed for r in unseeded.requests] == [None, None]


def test_eos_adds_no_text_and_no_stop_reason(tokenizer: Tokenizer) -> None:
    state = one(tokenizer, skip_special_tokens=False)
    deltas = run(state, [out("r-0-0", "Hel"), out("r-0-0", ids("lo") + [EOS], "stop", EOS)])
    assert [(d.text, d.finish_reason, d.stop_reason, d.first) for d in deltas] == [
        ("Hel", None, None, True), ("lo", "stop", None, False)]
    choice = state.choice(0)
    assert (choice.text, choice.token_ids[-1]) == ("Hello", EOS)


def test_eos_text_kept_with_include_stop_str_in_output(tokenizer: Tokenizer) -> None:
    state = one(tokenizer, skip_special_tokens=False, include_stop_str_in_output=True,
                spaces_between_special_tokens=False)
    run(state, [out("r-0-0", ids("Hello") + [EOS], "stop", EOS)])
    assert state.choice(0).text == "Hello</s>"


def test_stop_token_id_is_the_stop_reason_and_adds_no_text(tokenizer: Tokenizer) -> None:
    bang = char_id("!")
    state = one(tokenizer, stop_token_ids=[bang])
    (delta,) = run(state, [out("r-0-0", "Hey!", "stop", bang)])
    assert (delta.text, delta.finish_reason, delta.stop_reason) == ("Hey", "stop", bang)


def test_completed_structured_output_keeps_its_last_token(tokenizer: Tokenizer) -> None:
    """The core ends a completed grammar with "stop" and no stop token: all of it is text."""
    state = one(tokenizer)
    (delta,) = run(state, [out("r-0-0", '{"a": 1}', "stop", None)])
    assert (delta.text, delta.finish_reason, delta.stop_reason) == ('{"a": 1}', "stop", None)


def test_failed_constraint_ends_with_error_and_its_reason(tokenizer: Tokenizer) -> None:
    state = one(tokenizer)
    (delta,) = run(state, [out("r-0-0", "ab", "error", "the grammar cannot be enforced")])
    assert (delta.text, delta.finish_reason, delta.stop_reason) == (
        "ab", "error", "the grammar cannot be enforced")


def test_stop_string_cut_and_aborted_in_the_core(tokenizer: Tokenizer) -> None:
    state = one(tokenizer, stop=["o W"])
    deltas = run(state, [out("r-0-0", "Hel"), out("r-0-0", "lo Wor"), out("r-0-0", "ld", "length")])
    assert deltas[2] is None, "outputs after a stop string are dropped"
    assert [(d.text, d.finish_reason, d.stop_reason, d.abort) for d in deltas[:2]] == [
        ("Hel", None, None, False), ("l", "stop", "o W", True)]
    assert state.finished and state.choice(0).text == "Hell"


def test_stop_string_prefix_held_back_then_released(tokenizer: Tokenizer) -> None:
    state = one(tokenizer, stop=["lo!"])
    deltas = run(state, [out("r-0-0", "Hel"), out("r-0-0", "lo"), out("r-0-0", "?", "length")])
    assert [d.text for d in deltas] == ["He", "l", "lo?"]
    assert (deltas[2].finish_reason, deltas[2].stop_reason) == ("length", None)


def test_stop_string_kept_with_include_stop_str_in_output(tokenizer: Tokenizer) -> None:
    state = one(tokenizer, stop=["o W"], include_stop_str_in_output=True)
    run(state, [out("r-0-0", "Hello World", "length")])
    choice = state.choice(0)
    assert (choice.text, choice.finish_reason, choice.stop_reason) == ("Hello W", "stop", "o W")


def test_logprobs_and_cumulative_logprob(tokenizer: Tokenizer) -> None:
    state = one(tokenizer, logprobs=0)
    run(state, [out("r-0-0", "ab", logprobs=[-0.5, -1.0]), out("r-0-0", "c", "length",
                                                                logprobs=[-0.25])])
    choice = state.choice(0)
    assert [e.token_ids[0] for e in choice.logprobs] == ids("abc")
    assert choice.cumulative_logprob == -1.75


def test_without_a_tokenizer_only_token_ids(tokenizer: Tokenizer) -> None:
    state = RequestState("r", [Prompt([1], "")], SamplingParams(stop=["a"]), None)
    (delta,) = run(state, [out("r-0-0", "abc", "length")])
    assert (delta.text, delta.token_ids, delta.finish_reason) == ("", ids("abc"), "length")


def test_processor_routes_outputs_and_reports_aborts(tokenizer: Tokenizer) -> None:
    processor = OutputProcessor(tokenizer)
    a = processor.add_request("a", [Prompt([1], "")], SamplingParams(stop=["x"]))
    b = processor.add_request("b", [Prompt([1], "")], SamplingParams(n=2))
    with pytest.raises(ValueError, match="already in flight"):
        processor.add_request("a", [Prompt([1], "")], SamplingParams())
    step = processor.process_outputs([
        out("a-0-0", "1x2"), out("b-0-1", "yz", "length"), out("gone-0-0", "q")])
    assert [(s.request_id, d.index, d.text) for s, d in step.deltas] == [("a", 0, "1"),
                                                                       ("b", 1, "yz")]
    assert step.to_abort == ["a-0-0"]
    assert a.finished and not b.finished and b.unfinished_ids() == ["b-0-0"]
    assert processor.process_outputs([out("a-0-0", "3", "length")]).deltas == []
    assert processor.num_sequences == 3
    processor.remove([a, b])
    assert processor.num_sequences == 0
    assert processor.process_outputs([out("b-0-0", "k", "length")]).deltas == []
