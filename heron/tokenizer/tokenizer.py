"""Tokenizer wrapper, chat templates, and the incremental detokenizer with stop strings.

``Tokenizer`` wraps a transformers fast tokenizer and adds what serving needs: the set of
token ids that end generation, the chat template to use, and per-token strings for logprobs.

``IncrementalDetokenizer`` turns a growing list of output ids into text deltas. It decodes
a small window of ids per new token, never the whole output::

    ids:   ... p0 p1 p2 | o0 o1 o2 o3 | o4 o5
                        ^prefix       ^read  (o4 o5 not yet shown: they end in a partial
                                              UTF-8 character, decoded as U+FFFD)
    delta = decode(ids[prefix:]) minus decode(ids[prefix:read])

Decoding with a few ids of left context keeps word-initial spaces right (SentencePiece
decoders treat the first token of a sequence specially), and holding back ids whose text
ends in U+FFFD keeps a multi-byte character that spans byte-fallback tokens whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from heron.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
# Ids of left context decoded with each delta (enough for any decoder's look-behind).
CONTEXT_TOKENS = 5
# A UTF-8 character has at most 4 bytes, so at most 4 tokens can end in a partial one;
# text still ending in U+FFFD after that many is invalid bytes, shown as they are.
MAX_PENDING_TOKENS = 4
_NO_MAX_LENGTH = 10**12  # transformers' "no limit" sentinel is ~1e30

# Gemma's turn format (heron's own template text): <start_of_turn>{role}\n{content}<end_of_turn>\n,
# "assistant" is written "model", and a system prompt is folded into the first turn.
# Tools (heron's design; Gemma 3 has no tool format of its own): the definitions follow the
# system prompt, one JSON line each; an assistant's calls are hermes-style blocks
# <tool_call>{"name": ..., "arguments": {...}}</tool_call> (the format tool_choice constrains
# to); tool results are <tool_response>...</tool_response> lines in a user turn.
GEMMA_CHAT_TEMPLATE = (
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is not none -%}"
    "{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro tools_text(tools) -%}"
    "{{- 'You can call these tools:\n' -}}"
    "{%- for tool in tools -%}"
    "{{- (tool['function'] if tool['function'] is defined else tool) | tojson + '\n' -}}"
    "{%- endfor -%}"
    "{{- 'To call a tool, answer with <tool_call>{\"name\": <tool name>, \"arguments\": "
    "<arguments as a JSON object>}</tool_call>, one block per call.\n\n' -}}"
    "{%- endmacro -%}"
    "{%- macro call_of(call) -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{{- '<tool_call>{\"name\": ' + fn['name'] | tojson + ', \"arguments\": ' -}}"
    "{%- if fn['arguments'] is string -%}{{- fn['arguments'] -}}"
    "{%- else -%}{{- fn['arguments'] | tojson -}}{%- endif -%}"
    "{{- '}</tool_call>' -}}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- set turns = messages -%}"
    "{%- set system = '' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = text_of(messages[0]['content']) + '\n\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if tools -%}{%- set system = system + tools_text(tools) -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' -%}"
    "{{- '<start_of_turn>user\n' -}}"
    "{%- if loop.first -%}{{- system -}}{%- endif -%}"
    "{%- endif -%}"
    "{{- '<tool_response>' + text_of(message['content']) | trim + '</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<end_of_turn>\n' -}}"
    "{%- else -%}{{- '\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' -}}"
    "{%- if loop.first -%}{{- system -}}{%- endif -%}"
    "{{- text_of(message['content']) | trim -}}"
    "{%- if message['tool_calls'] -%}"
    "{%- if text_of(message['content']) | trim -%}{{- '\n' -}}{%- endif -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{{- call_of(call) -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<end_of_turn>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)


def read_chat_template(value: str) -> str:
    """``--chat-template``: a path to a template file, or the template text itself."""
    path = Path(value).expanduser()
    if "{{" not in value and "{%" not in value:
        try:
            return path.read_text()
        except OSError as err:
            raise ValueError(f"chat template file {value!r} cannot be read ({err}); pass a file "
                             "path or the Jinja template text itself") from err
    return value


class Tokenizer:
    """A transformers fast tokenizer plus serving metadata.

    ``eos_token_ids`` is every id that ends generation: the tokenizer's eos and the model's
    ``generation_config`` eos ids (an int or a list). ``chat_template`` is None when the model
    has none; ``apply_chat_template`` then raises ValueError.
    """

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase, *, generation_eos: int | list[int] | None = None,
                 chat_template: str | None = None, model_max_length: int | None = None,
                 name: str = "", tool_chat_template: str | None = None) -> None:
        self.hf = hf_tokenizer
        self.name = name or str(getattr(hf_tokenizer, "name_or_path", ""))
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self.chat_template = chat_template
        # a model's own template for requests with tools, where it names one ("tool_use")
        self.tool_chat_template = tool_chat_template
        self.vocab_size = len(hf_tokenizer)
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.eos_token_ids = _eos_ids(hf_tokenizer.eos_token_id, generation_eos)
        self.model_max_length = _max_length(hf_tokenizer.model_max_length, model_max_length)
        self.special_token_ids = frozenset(hf_tokenizer.all_special_ids) | frozenset(
            index for index, token in hf_tokenizer.added_tokens_decoder.items() if token.special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_pair(self, text: str, pair: str) -> list[int]:
        """Two texts as one input, joined as the tokenizer pairs them (a cross-encoder's
        query and document: its separators and special tokens)."""
        return list(self.hf(text, pair, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = False) -> str:
        """Text of ``ids``; with ``spaces_between_special_tokens`` (and specials kept) each
        special token is set off from its neighbours by one space, as slow HF tokenizers do."""
        if skip_special_tokens or not spaces_between_special_tokens:
            return self._decode(ids, skip_special_tokens)
        pieces: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self.special_token_ids:
                pieces += [self._decode(run, False)] if run else []
                pieces.append(self._decode([token_id], False))
                run = []
            else:
                run.append(token_id)
        pieces += [self._decode(run, False)] if run else []
        return " ".join(pieces)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each id decoded on its own (special tokens kept): the strings logprobs show."""
        if self._backend is not None:
            return list(self._backend.decode_batch([[i] for i in ids], skip_special_tokens=False))
        return [str(self.hf.decode([i], skip_special_tokens=False)) for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                            **template_kwargs: Any) -> str:
        """Render ``messages`` to the prompt text (encode it with ``add_special_tokens=False``:
        templates write the bos token themselves). A ``developer`` message is a ``system``
        message (OpenAI's newer name; most templates know only the older one)."""
        messages = [_developer_as_system(m) for m in messages]
        if self.chat_template is None:
            raise ValueError(f"model {self.name!r} has no chat template; pass one with --chat-template "
                             "(a file path or the Jinja text), or use the completions API")
        from jinja2 import TemplateError

        template = self.tool_chat_template if tools and self.tool_chat_template else self.chat_template
        try:
            rendered = self.hf.apply_chat_template(
                messages, tools=None if tools is None else list(tools),
                chat_template=template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **template_kwargs)
        except TemplateError as err:
            raise ValueError(f"chat template error: {err}") from err
        return str(rendered)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self._backend is not None:  # the Rust decoder: no Python-side clean-up pass
            return str(self._backend.decode(ids, skip_special_tokens=skip_special_tokens))
        return str(self.hf.decode(ids, skip_special_tokens=skip_special_tokens,
                                  clean_up_tokenization_spaces=False))


def _developer_as_system(message: dict[str, Any]) -> dict[str, Any]:
    if isinstance(message, dict) and message.get("role") == "developer":
        return {**message, "role": "system"}
    return message


def _eos_ids(tokenizer_eos: int | None, generation_eos: int | list[int] | None) -> set[int]:
    ids = {tokenizer_eos} if tokenizer_eos is not None else set()
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(int(i) for i in generation_eos)
    return ids


def _max_length(tokenizer_limit: int | None, model_limit: int | None) -> int | None:
    limits = [x for x in (tokenizer_limit, model_limit) if x is not None and 0 < x < _NO_MAX_LENGTH]
    return min(limits) if limits else None


class IncrementalDetokenizer:
    """Output ids -> text deltas for one request, with stop strings.

    ``update()`` after every engine step (returns the stop string that matched, if any),
    ``get_delta()`` for the text safe to show now, ``flush()`` once generation ends for
    eos / length reasons. Text that could still grow into a stop string is held back; a
    matched stop string is cut off (kept with ``include_stop_str_in_output``). Stop strings
    are looked for only once more than ``min_tokens`` tokens were generated, and only in
    text that new tokens added (plus the stop string's length of look-behind).

    ``content_start`` (a model that thinks; ``heron.server.reasoning``): given the text so far,
    where its content begins (None while inside the reasoning); stop strings are looked for,
    and held back, in the content only.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 content_start: Callable[[str], int | None] | None = None) -> None:
        self._tokenizer = tokenizer
        self._content_start = content_start
        self._skip_special = params.skip_special_tokens
        self._spaces = params.spaces_between_special_tokens
        self._stops: list[str] = list(params.stop or [])
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        # Left context from the prompt; not in the spaced mode, where each run of ordinary ids
        # is decoded on its own and the output must not open with a separating space.
        spaced = self._spaces and not self._skip_special
        context = [] if spaced else prompt_token_ids[-CONTEXT_TOKENS:]
        self._ids = [t for t in context if self._keeps(t)]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""  # all output text decoded so far (cut at the stop string once matched)
        self._sent = 0  # characters of _text handed out by get_delta / flush
        self.num_output_tokens = 0
        self.stop_str: str | None = None

    @property
    def output_text(self) -> str:
        """All output text decoded so far, cut at the stop string once one matched (it may run
        ahead of what ``get_delta`` handed out by a held-back stop-string prefix)."""
        return self._text

    @property
    def stopped(self) -> bool:
        return self.stop_str is not None

    def update(self, new_token_ids: Iterable[int], stop_terminated: bool = False) -> str | None:
        """Add new output ids. ``stop_terminated``: the last id is the eos / stop token that
        ended the request; its text is left out unless ``include_stop_str_in_output``.

        Returns the stop string matched by this update, else None (also after a stop: later
        ids are ignored)."""
        if self.stopped:
            return None
        new_ids = list(new_token_ids)
        self.num_output_tokens += len(new_ids)
        if stop_terminated and new_ids and not self._include_stop:
            new_ids.pop()
        before = len(self._text)
        for token_id in new_ids:
            if self._keeps(token_id):
                self._ids.append(token_id)
                self._text += self._advance(force=False)
        return self._check_stop(before)

    def get_delta(self) -> str:
        """Text not handed out yet that can no longer turn into a stop string."""
        end = len(self._text) if self.stopped else len(self._text) - self._held_back()
        delta = self._text[self._sent:end]
        self._sent = max(self._sent, end)
        return delta

    def flush(self) -> str:
        """At the end (eos / length): decode held-back ids and release all remaining text."""
        if not self.stopped and self._read_offset < len(self._ids):
            before = len(self._text)
            self._text += self._advance(force=True)
            self._check_stop(before)
        delta = self._text[self._sent:]
        self._sent = len(self._text)
        return delta

    def _keeps(self, token_id: int) -> bool:
        # Skipped special tokens decode to nothing: leaving them out keeps the window small.
        return not (self._skip_special and token_id in self._tokenizer.special_token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, self._skip_special, self._spaces)

    def _advance(self, force: bool) -> str:
        """The text the ids past ``read_offset`` add, or "" while they end mid-character."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        pending = len(self._ids) - self._read_offset
        incomplete = full_text.endswith(REPLACEMENT_CHAR) or len(full_text) <= len(prefix_text)
        if incomplete and not force and pending < MAX_PENDING_TOKENS:
            return ""
        # Slide the window: what was just read becomes the next step's left context.
        del self._ids[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return full_text[len(prefix_text):]

    def _stop_floor(self) -> int | None:
        """Where stop strings may begin: the content's start (None: none yet)."""
        return 0 if self._content_start is None else self._content_start(self._text)

    def _check_stop(self, before: int) -> str | None:
        if not self._stops or self.num_output_tokens <= self._min_tokens:
            return None
        floor = self._stop_floor()
        if floor is None:
            return None
        start = max(floor, before - self._max_stop_len + 1)
        found = [(index, stop) for stop in self._stops
                 if (index := self._text.find(stop, start)) != -1]
        if not found:
            return None
        index, stop = min(found, key=lambda match: match[0])
        self._text = self._text[:index + len(stop) if self._include_stop else index]
        self.stop_str = stop
        return stop

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        floor = self._stop_floor() if self._stops else None
        if not self._text or floor is None:
            return 0
        last, longest = self._text[-1], 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._text) - floor), longest, -1):
                if stop[size - 1] == last and self._text.endswith(stop[:size]):  # a slice only on a match
                    longest = size
                    break
        return longest
