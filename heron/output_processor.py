"""ONE place that turns engine outputs into choices, for the offline ``LLM`` and the server.

::

    a request: prompts x n        RequestState                       the engine core
    --------------------------    -------------------------------    ---------------
    (prompt p, sample i)     -->  EngineRequest "{id}-{p}-{i}"  -->  token ids in,
                                  (n=1, seed + i when seeded)         token ids out
    ChoiceDelta index p*n+i  <--  _Choice.consume(EngineOutput) <--  EngineOutput

``_Choice.consume`` is the only code that decides what a choice says, with vLLM's rules:

- text comes from an incremental detokenizer; text that could still grow into a stop string is
  held back; a matched stop string ends the choice (``finish_reason`` "stop", ``stop_reason``
  the string; cut from the text unless ``include_stop_str_in_output``) and the sequence is
  aborted in the core (``ChoiceDelta.abort``);
- an eos or ``stop_token_ids`` token that ended the sequence adds no text (unless
  ``include_stop_str_in_output``); its id stays in ``token_ids``;
- ``stop_reason`` is the ``stop_token_ids`` entry that ended it, and None for an eos token;
- a structured output that completed ends with "stop" and no stop token: its last token is text;
  one whose constraint failed ends with "error", ``stop_reason`` saying why.

The server drives one ``RequestState`` per API request (its engine client already routes
outputs per request); the offline ``LLM`` drives many through ``OutputProcessor``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from heron.engine.messages import EngineOutput, EngineRequest, TokenLogprobs

if TYPE_CHECKING:
    from heron.lora import LoRARequest
    from heron.sampling_params import SamplingParams
    from heron.tokenizer.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Prompt:
    """One tokenized prompt; ``text`` is what ``echo`` repeats (may be empty)."""

    token_ids: list[int]
    text: str


@dataclass
class ChoiceDelta:
    """What one engine output added to one choice."""

    index: int  # p * n + i: OpenAI's numbering of the choices of a request
    prompt_index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop_token_ids entry
    first: bool = False  # the choice's first delta (streams send the role / the echo then)
    abort: bool = False  # finished here (a stop string) while the core still runs it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Choice:
    """One engine sequence: its detokenizer and what it generated so far."""

    index: int
    prompt_index: int
    detok: IncrementalDetokenizer | None  # None: no tokenizer (token ids only)
    stop_token_ids: frozenset[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cumulative_logprob: float | None = None
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False

    def consume(self, out: EngineOutput) -> ChoiceDelta:
        ids = list(out.new_token_ids)
        self.token_ids += ids
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        new_logprobs = list(out.new_logprobs or [])
        self._add_logprobs(new_logprobs)
        # A token stop (eos / stop_token_ids) has a stop_reason from the core; a completed
        # structured output finishes "stop" without one, and its last token is text.
        by_token = out.finish_reason == "stop" and out.stop_reason is not None
        stop_str = self.detok.update(ids, stop_terminated=by_token) if self.detok and ids else None
        if stop_str is not None:
            self.finish_reason, self.stop_reason = "stop", stop_str
        elif out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, self._stop_reason(out)
        text = self._text_delta(flush=stop_str is None and out.finish_reason is not None)
        self.text += text
        delta = ChoiceDelta(self.index, self.prompt_index, text, ids, new_logprobs,
                            self.finish_reason, self.stop_reason, first=not self.started,
                            abort=stop_str is not None and not out.finished)
        self.started = True
        return delta

    def _stop_reason(self, out: EngineOutput) -> int | str | None:
        """The stop_token_ids entry that ended it (None for an eos); for "error", why."""
        if out.finish_reason == "error":
            return out.stop_reason
        return out.stop_reason if out.stop_reason in self.stop_token_ids else None

    def _text_delta(self, flush: bool) -> str:
        if self.detok is None:
            return ""
        return self.detok.flush() if flush else self.detok.get_delta()

    def _add_logprobs(self, entries: list[TokenLogprobs]) -> None:
        if not entries:
            return
        self.logprobs += entries
        self.cumulative_logprob = (self.cumulative_logprob or 0.0) + sum(
            e.logprobs[0] for e in entries)


class RequestState:
    """The choices of one request: ``len(prompts) * n`` engine sequences.

    Choice ``p * n + i`` is the i-th sample of prompt p; it runs as engine request
    ``"{request_id}-{p}-{i}"`` with ``n=1`` and, when the request is seeded, ``seed + i``.
    """

    def __init__(self, request_id: str, prompts: list[Prompt], params: SamplingParams,
                 tokenizer: Tokenizer | None, arrival_time: float = 0.0,
                 content_start: Callable[[], Callable[[str], int | None]] | None = None,
                 lora_request: LoRARequest | None = None) -> None:
        """``content_start``: makes, per choice, the detokenizer's guide to where a thinking
        model's content starts (stop strings apply there only); None: all text is content.
        ``lora_request``: the adapter every sequence runs with (None: the base model)."""
        self.request_id = request_id
        self.lora_request = lora_request
        self._content_start = content_start
        self.prompts = prompts
        self.n = params.n
        self.requests: list[EngineRequest] = []
        self.choices: dict[str, _Choice] = {}
        self.prompt_logprobs: dict[int, list[TokenLogprobs | None]] = {}
        for p, prompt in enumerate(prompts):
            for i in range(params.n):
                self._add_choice(p, i, prompt, params, tokenizer, arrival_time)

    def _add_choice(self, p: int, i: int, prompt: Prompt, params: SamplingParams,
                    tokenizer: Tokenizer | None, arrival_time: float) -> None:
        # Imported here: the heron.tokenizer package imports the loader (keep imports light).
        from heron.tokenizer.tokenizer import IncrementalDetokenizer

        child = params.clone(n=1, seed=None if params.seed is None else params.seed + i)
        seq_id = f"{self.request_id}-{p}-{i}"
        detok = None if tokenizer is None else IncrementalDetokenizer(
            tokenizer, prompt.token_ids, child,
            None if self._content_start is None else self._content_start())
        self.choices[seq_id] = _Choice(p * self.n + i, p, detok,
                                       frozenset(child.stop_token_ids or ()))
        self.requests.append(EngineRequest(request_id=seq_id, prompt_token_ids=prompt.token_ids,
                                           sampling_params=child, arrival_time=arrival_time,
                                           group=self.request_id,
                                           lora_request=self.lora_request))

    @property
    def num_choices(self) -> int:
        return len(self.choices)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices.values())

    def choice(self, index: int) -> _Choice:
        return list(self.choices.values())[index]

    def unfinished_ids(self) -> list[str]:
        return [sid for sid, c in self.choices.items() if c.finish_reason is None]

    def process(self, out: EngineOutput) -> ChoiceDelta | None:
        """The delta of one engine output; None for a sequence that already finished here (a
        late output after a stop string)."""
        choice = self.choices[out.request_id]
        if choice.finish_reason is not None:
            return None
        if out.prompt_logprobs is not None:
            self.prompt_logprobs.setdefault(choice.prompt_index, list(out.prompt_logprobs))
        return choice.consume(out)


@dataclass
class ProcessedOutputs:
    """One engine step's outputs, processed: the deltas, and the sequences to abort in the
    core (stopped here by a stop string)."""

    deltas: list[tuple[RequestState, ChoiceDelta]]
    to_abort: list[str]


class OutputProcessor:
    """Many requests at once: the offline ``LLM`` adds requests, feeds each step's outputs
    and removes what finished."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._by_sequence: dict[str, RequestState] = {}

    @property
    def num_sequences(self) -> int:
        """Sequences registered (added and not removed yet)."""
        return len(self._by_sequence)

    def add_request(self, request_id: str, prompts: list[Prompt], params: SamplingParams,
                    arrival_time: float = 0.0,
                    lora_request: LoRARequest | None = None) -> RequestState:
        state = RequestState(request_id, prompts, params, self.tokenizer, arrival_time,
                             lora_request=lora_request)
        taken = [sid for sid in state.choices if sid in self._by_sequence]
        if taken:
            raise ValueError(f"request id {taken[0]!r} is already in flight")
        self._by_sequence.update(dict.fromkeys(state.choices, state))
        return state

    def remove(self, states: Iterable[RequestState]) -> None:
        for state in states:
            for sid in state.choices:
                self._by_sequence.pop(sid, None)

    def process_outputs(self, outputs: Iterable[EngineOutput]) -> ProcessedOutputs:
        processed = ProcessedOutputs([], [])
        for out in outputs:
            state = self._by_sequence.get(out.request_id)
            delta = None if state is None else state.process(out)
            if state is None or delta is None:
                continue  # aborted, or finished here already
            processed.deltas.append((state, delta))
            if delta.abort:
                processed.to_abort.append(out.request_id)
        return processed
