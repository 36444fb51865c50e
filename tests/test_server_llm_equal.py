"""Same request, same result: the offline ``LLM.generate`` and ``/v1/completions`` on a real
server share one output processor, so text, token counts, finish and stop reasons and logprobs
agree, with vLLM's rules (an eos or stop_token_ids token adds no text; stop_reason is None on
eos, the token id for stop_token_ids, the string for a stop string).

The model is the tiny random Llama with a character tokenizer; its config names a second eos
id, an ordinary token the model writes greedily a few tokens into ``PROMPT``, so the eos text
is visible (not a special token that decoding skips anyway).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import transformers

from heron import LLM, SamplingParams
from heron.outputs import RequestOutput
from tests.server_utils import RemoteServer
from tests.tiny_models import save_char_tokenizer, save_tiny_model

PROMPT = "abc"  # its greedy output holds no eos token in the first MAX_TOKENS
MAX_TOKENS = 12
EOS_POSITION = 4  # the greedy output's token at this index becomes an eos id (if new there)


@dataclass(frozen=True)
class Tiny:
    path: Path
    greedy: list[int]  # greedy output ids for PROMPT, eos ignored
    eos: int  # the extra eos id
    eos_at: int  # where it first appears in ``greedy``


def _greedy_ids(path: Path, prompt_ids: list[int], steps: int) -> list[int]:
    """transformers' greedy continuation in float32 (the reference heron matches in float32)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    path = save_tiny_model(tmp_path_factory.mktemp("tiny-eos"))
    save_char_tokenizer(path)
    prompt_ids = transformers.AutoTokenizer.from_pretrained(path).encode(PROMPT)
    greedy = _greedy_ids(path, prompt_ids, MAX_TOKENS)
    at = next(k for k in range(EOS_POSITION, MAX_TOKENS - 2)
              if greedy[k] not in greedy[:k] and greedy[k] >= 4)  # not a special token
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = [2, greedy[at]]
    (path / "config.json").write_text(json.dumps(config))
    return Tiny(path, greedy, greedy[at], at)


@pytest.fixture(scope="module")
def server(tiny: Tiny) -> Iterator[RemoteServer]:
    with RemoteServer([str(tiny.path), "--dtype", "float32", "--kv-cache-memory", "16MiB"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def llm(tiny: Tiny) -> LLM:
    return LLM(str(tiny.path), dtype="float32", kv_cache_memory=16 << 20)


def both(llm: LLM, server: RemoteServer, **fields: Any) -> tuple[RequestOutput, dict]:
    """The same request through LLM.generate and POST /v1/completions."""
    fields = {"max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    offline = llm.generate(PROMPT, SamplingParams(**fields), use_tqdm=False)[0]
    r = httpx.post(server.url("/v1/completions"), json={"prompt": PROMPT, **fields}, timeout=60)
    assert r.status_code == 200, r.text
    return offline, r.json()


def assert_same(offline: RequestOutput, online: dict) -> None:
    """Every choice: text, finish and stop reasons; the token count in the usage."""
    assert [(o.text, o.finish_reason, o.stop_reason) for o in offline.outputs] == [
        (c["text"], c["finish_reason"], c["stop_reason"]) for c in online["choices"]]
    assert online["usage"]["completion_tokens"] == sum(len(o.token_ids) for o in offline.outputs)
    assert online["usage"]["prompt_tokens"] == len(offline.prompt_token_ids)


def text_of(llm: LLM, ids: list[int]) -> str:
    return llm.get_tokenizer().decode(ids)


def test_ignore_eos_runs_to_length_past_the_eos_token(tiny: Tiny, llm: LLM,
                                                      server: RemoteServer) -> None:
    offline, online = both(llm, server, ignore_eos=True)
    assert_same(offline, online)
    out = offline.outputs[0]
    assert out.token_ids == tiny.greedy, "heron's greedy output is transformers'"
    assert (out.finish_reason, out.stop_reason) == ("length", None)
    assert out.text == text_of(llm, tiny.greedy)


@pytest.mark.parametrize("include", [False, True])
def test_eos_adds_no_text_and_no_stop_reason(tiny: Tiny, llm: LLM, server: RemoteServer,
                                             include: bool) -> None:
    offline, online = both(llm, server, include_stop_str_in_output=include)
    assert_same(offline, online)
    out = offline.outputs[0]
    assert out.token_ids == tiny.greedy[:tiny.eos_at + 1]  # the eos id is kept in token_ids
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    assert out.text == text_of(llm, tiny.greedy[:tiny.eos_at + include])


def test_stop_token_ids_add_no_text_and_are_the_stop_reason(tiny: Tiny, llm: LLM,
                                                            server: RemoteServer) -> None:
    stop = tiny.greedy[2]
    first = tiny.greedy.index(stop)
    offline, online = both(llm, server, stop_token_ids=[stop])
    assert_same(offline, online)
    out = offline.outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (
        tiny.greedy[:first + 1], "stop", stop)
    assert out.text == text_of(llm, tiny.greedy[:first])


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings(tiny: Tiny, llm: LLM, server: RemoteServer, include: bool) -> None:
    full = text_of(llm, tiny.greedy[:tiny.eos_at])
    stop = full[3:8]  # across token boundaries
    offline, online = both(llm, server, stop=[stop, "never written"],
                           include_stop_str_in_output=include)
    assert_same(offline, online)
    out = offline.outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.text == full[:full.index(stop) + (len(stop) if include else 0)]


def test_min_tokens_holds_off_the_eos(tiny: Tiny, llm: LLM, server: RemoteServer) -> None:
    offline, online = both(llm, server, min_tokens=tiny.eos_at + 2)
    assert_same(offline, online)
    out = offline.outputs[0]
    assert tiny.eos not in out.token_ids[:tiny.eos_at + 2]
    assert len(out.token_ids) >= tiny.eos_at + 2
    assert out.finish_reason in ("stop", "length")


def test_n3_seeded_sampling(llm: LLM, server: RemoteServer) -> None:
    offline, online = both(llm, server, n=3, seed=11, temperature=1.0, ignore_eos=True)
    assert_same(offline, online)
    assert [c["index"] for c in online["choices"]] == [0, 1, 2]
    texts = [o.text for o in offline.outputs]
    assert len(set(texts)) == 3, f"seed + i gives each choice its own draw: {texts}"
    alone = llm.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=12,
                                                ignore_eos=True), use_tqdm=False)[0]
    assert alone.outputs[0].text == texts[1], "choice 1 samples with seed + 1"


def test_logprobs(llm: LLM, server: RemoteServer) -> None:
    offline, online = both(llm, server, logprobs=2, ignore_eos=True)
    assert_same(offline, online)
    lp = online["choices"][0]["logprobs"]
    out = offline.outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == MAX_TOKENS
    chosen = [entry[t] for entry, t in zip(out.logprobs, out.token_ids)]
    assert lp["tokens"] == [c.decoded_token for c in chosen]
    assert lp["token_logprobs"] == pytest.approx([c.logprob for c in chosen], abs=1e-5)
    for top, entry in zip(lp["top_logprobs"], out.logprobs):
        best = sorted(entry.values(), key=lambda c: -c.logprob)[:2]
        assert top == pytest.approx({c.decoded_token: c.logprob for c in best}, abs=1e-5)
    assert out.cumulative_logprob == pytest.approx(sum(c.logprob for c in chosen))


def test_stream_chat_pieces_join_to_chat(llm: LLM) -> None:
    """LLM.stream_chat runs on the same output processor: its pieces join to LLM.chat's answer;
    closing it early aborts the request and forgets it."""
    messages = [{"role": "user", "content": PROMPT}]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    whole = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
    pieces = list(llm.stream_chat(messages, params))
    assert "".join(p.text for p in pieces) == whole.text
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids
    assert [p.finish_reason for p in pieces] == [None] * (len(pieces) - 1) + ["length"]
    stream = llm.stream_chat(messages, params)
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished_requests() and llm.processor.num_sequences == 0
