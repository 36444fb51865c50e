"""SamplingParams: every bad value is a ValueError naming its field; good values normalise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from heron.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    SamplingParams,
)

INVALID: list[tuple[str, object]] = [
    ("n", 0),
    ("n", MAX_N + 1),
    ("n", 1.5),
    ("n", True),
    ("n", "2"),
    ("presence_penalty", -2.01),
    ("presence_penalty", 2.5),
    ("presence_penalty", math.nan),
    ("presence_penalty", "high"),
    ("frequency_penalty", -3.0),
    ("frequency_penalty", 2.01),
    ("frequency_penalty", None),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", 2.5),
    ("repetition_penalty", math.inf),
    ("temperature", -0.1),
    ("temperature", 2.01),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "hot"),
    ("temperature", None),
    ("temperature", True),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 2.0),
    ("top_k", None),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("min_p", math.nan),
    ("seed", 1.5),
    ("seed", "7"),
    ("seed", True),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 2.0),
    ("min_tokens", -1),
    ("min_tokens", 17),  # above the default max_tokens (16)
    ("min_tokens", 1.0),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", True),
    ("logprobs", 2.0),
    ("prompt_logprobs", -1),
    ("prompt_logprobs", MAX_LOGPROBS + 1),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", ["ok", 3]),
    ("stop", 5),
    ("stop", ["x"] * (MAX_STOP_STRINGS + 1)),
    ("stop", ["ab" * (MAX_STOP_CHARS // 4), "ab" * (MAX_STOP_CHARS // 4) + "!"]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["a"]),
    ("stop_token_ids", [None]),
    ("stop_token_ids", 5),
    ("logit_bias", {1: 100.5}),
    ("logit_bias", {1: -101.0}),
    ("logit_bias", {1: math.nan}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"x": 1.0}),
    ("logit_bias", {1: "a"}),
    ("logit_bias", [1, 2]),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_value_raises_value_error_naming_the_field(name: str, value: object) -> None:
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**{name: value})  # type: ignore[arg-type]
    assert str(excinfo.value).startswith(f"{name} must be")


def test_min_tokens_above_explicit_max_tokens() -> None:
    with pytest.raises(ValueError, match=r"^min_tokens must be at most max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=1000).min_tokens == 1000


def test_boundaries_are_accepted() -> None:
    p = SamplingParams(
        n=MAX_N,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=2.0,
        temperature=2.0,
        top_p=1.0,
        top_k=1,
        min_p=1.0,
        logprobs=MAX_LOGPROBS,
        prompt_logprobs=0,
        logit_bias={0: -100.0, 5: 100},
        max_tokens=1,
        min_tokens=1,
        seed=-3,
    )
    assert p.logit_bias == {0: -100.0, 5: 100.0}
    assert p.seed == -3


def test_greedy_normalises_other_knobs() -> None:
    p = SamplingParams(temperature=1e-6, top_p=0.5, top_k=5, min_p=0.3)
    assert p.greedy
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.0, 1.0, 0, 0.0)
    q = SamplingParams(temperature=0.7, top_p=0.5, top_k=5)
    assert not q.greedy
    assert (q.temperature, q.top_p, q.top_k) == (0.7, 0.5, 5)


def test_normalised_forms() -> None:
    p = SamplingParams(stop="END", stop_token_ids=(7, 9), top_k=-1, logit_bias={"12": 3})
    assert p.stop == ["END"]
    assert p.stop_token_ids == [7, 9]
    assert p.top_k == 0  # -1 and 0 both mean disabled
    assert p.logit_bias == {12: 3.0}  # JSON object keys arrive as strings
    assert p.all_stop_token_ids == {7, 9}
    assert SamplingParams(stop=None).stop == []


def test_numpy_scalars_become_python_numbers() -> None:
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(4), stop_token_ids=[np.int64(3)])
    assert type(p.temperature) is float and p.temperature == 0.5
    assert type(p.top_k) is int and p.top_k == 4
    assert p.stop_token_ids == [3] and type(p.stop_token_ids[0]) is int


def test_clone_keeps_engine_stop_ids_and_revalidates() -> None:
    p = SamplingParams(stop_token_ids=[5])
    p.all_stop_token_ids.add(1)  # the engine adds EOS
    q = p.clone(temperature=0.3)
    assert q.all_stop_token_ids == {1, 5}
    assert q.temperature == 0.3 and p.temperature == 1.0
    with pytest.raises(ValueError, match="^top_p must be"):
        p.clone(top_p=0.0)
