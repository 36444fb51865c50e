"""The grammar engine (llguidance): specs -> grammars -> per-request matchers -> token bitmasks.

::

    API process                               engine core process
    -----------                               -------------------
    SpecValidator.check(spec)                 StructuredOutputManager.prepare(request)
      builds the grammar without a              cache hit: Grammar(template.deep_copy())
      tokenizer: a bad spec is a 400            miss: compile on a worker thread; the request
      (LRU of specs that passed)                waits outside the scheduler until it is ready
                                              runner: fill_bitmask(grammars) -> [n, ceil(V/32)]
                                              scheduler: Grammar.advance(token) after each token

Why llguidance: its masks cost what xgrammar's do, it compiles schemas faster, it has no
dependencies (xgrammar pulls in triton), and its parser limits ("fuel") bound the work any one
grammar can cause (the measurements are in the README). Its tokenizer index takes seconds and
hundreds of MB to build, once, holding the GIL: the core process builds it before it serves
(``heron.engine.core_proc``), so that no running stream stalls behind it. The tokenizer that
encodes a grammar's forced text runs in a process that the first compile starts
(``heron.engine.forced_text``): its load stalls nothing, and it is not resident until used.

Grammar text comes from ``heron.structured.grammar`` (shared with the API side's validation).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from heron.engine.forced_text import EncoderProcess
from heron.engine.grammar_vocab import GrammarVocabulary, index_tokenizer_file
from heron.structured.grammar import describe_kind, grammar_text, short_error
from heron.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    import llguidance

    from heron.engine.request import Request

logger = logging.getLogger(__name__)

_WAIT_S = 0.05  # an idle core waits this long for a compile before looking at its inputs again


# ==== engine side: per-request matcher ============================================================


class Grammar:
    """One request's position in its grammar: fills its row of the bitmask, advances by tokens."""

    def __init__(self, matcher: llguidance.LLMatcher, label: str = "") -> None:
        self.matcher = matcher
        self.label = label
        self.error: str | None = None  # set when the output can no longer be constrained

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Set bit ``t`` of ``bitmask[row]`` ([n, ceil(V/32)] int32, CPU) iff token t is allowed."""
        target = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def advance(self, token_id: int) -> bool:
        """Consume a sampled token; True when the output is complete (nothing but the end can
        follow) or the grammar failed: then ``error`` says why (a parser limit hit on the way,
        an empty language: the sampled token came from a mask that allowed nothing valid)."""
        if not self.matcher.consume_token(token_id) or self.matcher.is_error():
            reason = short_error(self.matcher.get_error()) or f"token {token_id} does not fit"
            self.error = f"the {self.label} constraint cannot be enforced: {reason}"
            logger.warning("%s", self.error)
            return True
        return bool(self.matcher.is_stopped())


def _index_tokenizer(hf_tokenizer: Any, vocab_size: int,
                     eos_token_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's index of a fast HF tokenizer. ``llguidance.hf.from_tokenizer`` first copies
    the Rust tokenizer to switch padding and truncation off (~1.4 s for Gemma's 262k tokens,
    holding the GIL); heron's tokenizers have neither, so their JSON is read directly."""
    import llguidance
    import llguidance.hf

    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    eos = eos_token_ids or None
    if backend is None or backend.padding is not None or backend.truncation is not None:
        return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos)
    if eos is None:
        eos = hf_tokenizer.eos_token_id
    return llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)


def fill_bitmask(grammars: Sequence[Grammar], vocab_size: int) -> torch.Tensor:
    """[len(grammars), ceil(vocab_size / 32)] int32 on CPU: bit t of word w allows token 32w+t."""
    bitmask = torch.empty((len(grammars), (vocab_size + 31) // 32), dtype=torch.int32)
    for row, grammar in enumerate(grammars):
        grammar.fill_bitmask(bitmask, row)
    return bitmask


# ==== engine side: compilation off the hot loop ===================================================


class StructuredOutputManager:
    """Gives constrained requests their ``Grammar``; compiles on one worker thread.

    Compiled grammars are kept per distinct spec (an LRU of ``cache_size`` unconsumed
    matchers; a request gets a cheap ``deep_copy``). A request whose spec is not compiled yet
    waits here, not in the scheduler; ``collect()`` hands it over once its grammar is ready,
    or reports why the spec failed. The tokenizer index is built by ``build_index`` (the core
    process calls it before serving), else on first use.
    """

    def __init__(self, load_hf_tokenizer: Callable[[], Any], vocab_size: int,
                 eos_token_ids: Iterable[int], cache_size: int = 64,
                 tokenizer_json: Callable[[], Path | None] | None = None) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be positive, got {cache_size}")
        self._load_hf_tokenizer = load_hf_tokenizer
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[StructuredOutputsParams, llguidance.LLMatcher] = OrderedDict()
        self._inflight: dict[StructuredOutputsParams, concurrent.futures.Future] = {}
        self._pending: dict[str, Request] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._vocabulary: GrammarVocabulary | None = None  # the index's encoder, when ours

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def prepare(self, request: Request) -> bool:
        """True when ``request`` can be scheduled now (unconstrained, or its grammar is cached);
        False when it waits for a compile (see ``collect``)."""
        params = request.sampling_params.structured_outputs
        if params is None:
            return True
        template = self._cache.get(params)
        if template is not None:
            self._cache.move_to_end(params)
            request.grammar = Grammar(template.deep_copy(), params.kind)
            return True
        if params not in self._inflight:
            self._inflight[params] = self._pool().submit(self._compile, params)
        self._pending[request.request_id] = request
        return False

    def collect(self, wait: bool = False) -> tuple[list[Request], list[tuple[Request, str]]]:
        """(requests whose grammar is ready, (request, error) for specs that failed). ``wait``:
        block up to 50 ms for a compile to finish (the caller has nothing else to do)."""
        if wait and self._inflight:
            concurrent.futures.wait(self._inflight.values(), timeout=_WAIT_S,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        done = {p: f for p, f in self._inflight.items() if f.done()}
        for params, future in done.items():
            del self._inflight[params]
            if future.exception() is None:
                self._remember(params, future.result())
        ready: list[Request] = []
        failed: list[tuple[Request, str]] = []
        for request_id, request in list(self._pending.items()):
            spec = request.sampling_params.structured_outputs
            if spec in done:
                del self._pending[request_id]
                error = done[spec].exception()
                if error is None:
                    request.grammar = Grammar(done[spec].result().deep_copy(), spec.kind)
                    ready.append(request)
                else:
                    failed.append((request, str(error)))
        return ready, failed

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        """Drop waiting requests (ids not waiting here are ignored)."""
        return [r for rid in request_ids if (r := self._pending.pop(rid, None)) is not None]

    def build_index(self) -> None:
        """Build the tokenizer index now rather than on the first constrained request (the core
        process does it before it serves). A tokenizer that cannot be loaded is logged here;
        constrained requests then fail with that reason."""
        try:
            self._tokenizer()
        except ValueError as e:
            logger.warning("structured outputs are unavailable: %s", e)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._vocabulary is not None:
            self._vocabulary.encoder.close()

    # ---- worker thread ------------------------------------------------------------------------

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="heron-grammar")
        return self._executor

    def _compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """Runs on the worker thread (llguidance releases the GIL while it builds)."""
        from llguidance import LLMatcher

        start = time.perf_counter()
        index = self._tokenizer()
        if self._vocabulary is not None and self._vocabulary.encoder.pid is None:
            self._start_encoder(self._vocabulary.encoder)
        matcher = LLMatcher(index, grammar_text(params, think_tokens=bool(params.think)))
        if params.think and "unknown special token" in matcher.get_error():
            # This vocabulary has no <think> / </think> tokens: the tags are text.
            matcher = LLMatcher(index, grammar_text(params))
        if matcher.is_error():
            raise ValueError(f"{describe_kind(params.kind)} does not compile: "
                             f"{short_error(matcher.get_error())}")
        logger.debug("compiled %s in %.1f ms", params.describe(), (time.perf_counter() - start) * 1e3)
        return matcher

    def _tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            start = time.perf_counter()
            self._ll_tokenizer = self._index_from_json() or self._index_from_hf()
            logger.info("structured outputs: tokenizer index built in %.1f s",
                        time.perf_counter() - start)
        return self._ll_tokenizer

    @staticmethod
    def _start_encoder(encoder: EncoderProcess) -> None:
        """On the first compile, before the matcher needs it (see ``forced_text``)."""
        start = time.perf_counter()
        encoder.start()
        logger.info("structured outputs: forced-text tokenizer process (pid %s) ready in %.1f s",
                    encoder.pid, time.perf_counter() - start)

    def _index_from_json(self) -> llguidance.LLTokenizer | None:
        """From the tokenizer.json on disk, without building the transformers tokenizer (~2.5 s
        less), through ``grammar_vocab`` (the trie alone: half the memory; the encoder is a
        process the first compile starts) when the eos ids are known."""
        path = self._tokenizer_json() if self._tokenizer_json is not None else None
        if path is None:
            return None
        import llguidance

        try:
            if self.eos_token_ids:
                index, self._vocabulary = index_tokenizer_file(path, self.vocab_size,
                                                               self.eos_token_ids)
                return index
            return llguidance.LLTokenizer(path.read_text(), n_vocab=self.vocab_size)
        except Exception as e:  # noqa: BLE001 - any failure: the HF tokenizer's way
            logger.debug("indexing %s directly failed (%s); loading the tokenizer", path, e)
            return None

    def _index_from_hf(self) -> llguidance.LLTokenizer:
        try:
            hf_tokenizer = self._load_hf_tokenizer()
        except Exception as e:  # noqa: BLE001 - any load failure means "no constraints here"
            raise ValueError(f"structured outputs need the model's tokenizer, which could "
                             f"not be loaded: {e}") from e
        return _index_tokenizer(hf_tokenizer, self.vocab_size, self.eos_token_ids)

    def _remember(self, params: StructuredOutputsParams, matcher: llguidance.LLMatcher) -> None:
        self._cache[params] = matcher
        self._cache.move_to_end(params)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
