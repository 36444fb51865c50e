"""Tokenizer wrapper, chat templates and the incremental detokenizer (stop strings, UTF-8).

Uses the default model's Gemma tokenizer (262k vocab, SentencePiece with byte fallback),
built from the GGUF by heron (~2 s) and served from the heron cache afterwards. The ``slow``
tests hold it, freshly built and reloaded from the cache, to transformers' own GGUF tokenizer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import transformers

from heron.config import ModelConfig
from heron.loader.default_model import locate_default_model
from heron.sampling_params import SamplingParams
from heron.tokenizer import load_tokenizer
from heron.tokenizer.tokenizer import (
    CONTEXT_TOKENS,
    GEMMA_CHAT_TEMPLATE,
    MAX_PENDING_TOKENS,
    IncrementalDetokenizer,
    Tokenizer,
    read_chat_template,
)

TEXTS = [
    "Hello world, this is a test.",
    "héllo 😀 你好世界 — ünïcödé",
    "def f(x):\n    return x ** 2  # square\n",
    "rare chars 𝔘ꙮᚠ between words 𝔘𝔘 end",
    "  leading and trailing spaces  ",
]
PROMPT = "The answer is:"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(ModelConfig())


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _stream(tok: Tokenizer, ids: list[int], params: SamplingParams,
            prompt: list[int] | None = None) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed ids one at a time; return the detokenizer, the deltas and the stop string hit."""
    detok = IncrementalDetokenizer(tok, prompt if prompt is not None else _ids(tok, PROMPT), params)
    deltas: list[str] = []
    stop = None
    for token_id in ids:
        stop = detok.update([token_id])
        deltas.append(detok.get_delta())
        if stop is not None:
            break
    if stop is None:
        deltas.append(detok.flush())
    return detok, deltas, stop


# ---------------------------------------------------------------------------- the wrapper


def test_default_tokenizer_metadata(tok: Tokenizer) -> None:
    assert tok.vocab_size == 262144
    assert tok.bos_token_id == 2
    assert tok.eos_token_ids == {1, 106}  # <eos> and <end_of_turn>
    assert tok.model_max_length == 32768
    assert tok.encode("Hello world") == [2, 9259, 1902]
    assert tok.encode("Hello world", add_special_tokens=False) == [9259, 1902]


def test_token_strings_keep_special_tokens(tok: Tokenizer) -> None:
    assert tok.token_strings([2, 9259, 1902, 106]) == ["<bos>", "Hello", " world", "<end_of_turn>"]
    # a byte-fallback piece of a multi-byte character shows as U+FFFD on its own
    assert tok.token_strings(_ids(tok, "ꙮ")) == ["\ufffd"] * 3


def test_decode_skip_and_spaces_between_special_tokens(tok: Tokenizer) -> None:
    ids = [105, 2364, 107, 9259, 106]  # <start_of_turn>user\nHello<end_of_turn>
    assert tok.decode(ids) == "user\nHello"
    assert tok.decode(ids, skip_special_tokens=False) == "<start_of_turn>user\nHello<end_of_turn>"
    assert (tok.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=True)
            == "<start_of_turn> user\nHello <end_of_turn>")


# ---------------------------------------------------------------------------- detokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(tok: Tokenizer, text: str) -> None:
    ids = _ids(tok, text)
    detok, deltas, stop = _stream(tok, ids, SamplingParams())
    assert stop is None
    assert "".join(deltas) == tok.decode(ids) == text
    assert detok.output_text == text
    assert all("\ufffd" not in d for d in deltas)  # never half a character


def test_multibyte_character_spanning_tokens(tok: Tokenizer) -> None:
    ids = _ids(tok, "aꙮb")
    char_ids = _ids(tok, "ꙮ")
    assert len(char_ids) == 3 and all(i in ids for i in char_ids)  # three byte-fallback tokens
    detok = IncrementalDetokenizer(tok, _ids(tok, PROMPT), SamplingParams())
    shown = []
    for token_id in ids:
        detok.update([token_id])
        shown.append(detok.get_delta())
    assert shown == ["a", "", "", "ꙮ", "b"]


def test_incomplete_character_released_by_flush(tok: Tokenizer) -> None:
    char_ids = _ids(tok, "𝔘")
    assert len(char_ids) == 4
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.update(char_ids[:2])  # generation ends mid-character (length limit)
    assert detok.get_delta() == ""
    assert detok.flush() == tok.decode(char_ids[:2]) == "\ufffd\ufffd"


def test_multiple_tokens_per_update(tok: Tokenizer) -> None:
    ids = _ids(tok, TEXTS[3])
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    pieces = []
    for start in range(0, len(ids), 3):
        detok.update(ids[start:start + 3])
        pieces.append(detok.get_delta())
    pieces.append(detok.flush())
    assert "".join(pieces) == TEXTS[3]


def test_decodes_a_bounded_window(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = _ids(tok, " ".join(TEXTS) * 4)
    assert len(ids) > 200
    expected = tok.decode(ids)
    sizes: list[int] = []
    original = Tokenizer._decode

    def spy(self: Tokenizer, ids: list[int], skip: bool) -> str:
        sizes.append(len(ids))
        return original(self, ids, skip)

    monkeypatch.setattr(Tokenizer, "_decode", spy)
    _, deltas, _ = _stream(tok, ids, SamplingParams())
    assert "".join(deltas) == expected
    assert max(sizes) <= CONTEXT_TOKENS + MAX_PENDING_TOKENS  # O(1) work per token


def test_skip_special_tokens_false_keeps_them(tok: Tokenizer) -> None:
    ids = [105, 2364, 107, 9259, 106]
    for spaces in (False, True):
        params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=spaces)
        _, deltas, _ = _stream(tok, ids, params)
        assert "".join(deltas) == tok.decode(ids, False, spaces)


def test_special_tokens_skipped_by_default(tok: Tokenizer) -> None:
    ids = [105, 2364, 107, 9259, 106, 1]
    _, deltas, _ = _stream(tok, ids, SamplingParams())
    assert "".join(deltas) == "user\nHello"


def test_stop_terminated_drops_the_stop_token_text(tok: Tokenizer) -> None:
    ids = _ids(tok, "Hello world")
    params = SamplingParams(skip_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], params)
    detok.update(ids + [1], stop_terminated=True)
    assert detok.flush() == "Hello world"  # not "Hello world<eos>"


# ---------------------------------------------------------------------------- stop strings


def test_single_stop_string(tok: Tokenizer) -> None:
    ids = _ids(tok, "Hello world. Goodbye world.")
    detok, deltas, stop = _stream(tok, ids, SamplingParams(stop="Goodbye"))
    assert stop == "Goodbye"
    assert detok.stopped and detok.stop_str == "Goodbye"
    assert detok.output_text == "Hello world. "
    assert "".join(deltas) == "Hello world. "
    assert detok.update(_ids(tok, " more")) is None  # ignored after the stop
    assert detok.output_text == "Hello world. "


def test_earliest_of_multiple_stop_strings_wins(tok: Tokenizer) -> None:
    ids = _ids(tok, "one two three four")
    detok, deltas, stop = _stream(tok, ids, SamplingParams(stop=["four", "three", "xyz"]))
    assert stop == "three"
    assert detok.output_text == "".join(deltas) == "one two "


def test_stop_string_spanning_tokens(tok: Tokenizer) -> None:
    text = "Hello world, again"
    ids = _ids(tok, text)
    assert len(ids) >= 4
    detok, deltas, stop = _stream(tok, ids, SamplingParams(stop="lo wor"))
    assert stop == "lo wor"
    assert detok.output_text == "".join(deltas) == "Hel"


def test_stop_string_at_the_very_start(tok: Tokenizer) -> None:
    ids = _ids(tok, "STOP and more")
    detok, deltas, stop = _stream(tok, ids, SamplingParams(stop="STOP"))
    assert stop == "STOP"
    assert detok.output_text == "" and "".join(deltas) == ""


def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    ids = _ids(tok, "Hello world. Goodbye world.")
    params = SamplingParams(stop=["Goodbye"], include_stop_str_in_output=True)
    detok, deltas, stop = _stream(tok, ids, params)
    assert stop == "Goodbye"
    assert detok.output_text == "".join(deltas) == "Hello world. Goodbye"


def test_stop_prefix_is_held_back_then_flushed(tok: Tokenizer) -> None:
    ids = _ids(tok, "Hello wor")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop="world"))
    shown = []
    for token_id in ids:
        assert detok.update([token_id]) is None
        shown.append(detok.get_delta())
    assert "".join(shown) == "Hello "  # "wor" could still become "world"
    assert detok.output_text == "Hello wor"
    assert detok.flush() == "wor"  # generation ended (length): nothing can complete it now


def test_held_back_prefix_released_when_it_diverges(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop="world"))
    detok.update(_ids(tok, "Hello wor"))
    assert detok.get_delta() == "Hello "
    detok.update(_ids(tok, "k done"))
    assert detok.get_delta() == "work done"


def test_stop_strings_wait_for_min_tokens(tok: Tokenizer) -> None:
    ids = _ids(tok, "stop here and stop there")
    assert len(ids) >= 5
    detok, deltas, stop = _stream(tok, ids, SamplingParams(stop="stop", min_tokens=2, max_tokens=20))
    assert stop == "stop"
    assert detok.output_text == "".join(deltas) == "stop here and "


def test_stop_matches_final_text_minus_stop(tok: Tokenizer) -> None:
    text = "rare chars 𝔘ꙮᚠ between words"
    ids = _ids(tok, text)
    detok, deltas, stop = _stream(tok, ids, SamplingParams(stop=["between"]))
    assert stop == "between"
    assert "".join(deltas) == detok.output_text == tok.decode(ids).split("between")[0]


# ---------------------------------------------------------------------------- chat templates


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there "},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
]


def test_builtin_gemma_template_exact(tok: Tokenizer) -> None:
    assert tok.chat_template == GEMMA_CHAT_TEMPLATE
    expected = ("<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
                "<start_of_turn>model\nHello.<end_of_turn>\n"
                "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
                "<start_of_turn>model\n")
    assert tok.apply_chat_template(MESSAGES) == expected
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == expected.removesuffix(
        "<start_of_turn>model\n")
    ids = tok.encode(expected, add_special_tokens=False)
    assert ids[:3] == [2, 105, 2364] and ids.count(2) == 1  # one <bos>, turns as single tokens


def test_continue_final_message(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Count:"}, {"role": "assistant", "content": "1, 2,"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert text == "<bos><start_of_turn>user\nCount:<end_of_turn>\n<start_of_turn>model\n1, 2,"


def test_developer_is_system_even_where_the_template_rejects_it(tok: Tokenizer) -> None:
    developer = [{**MESSAGES[0], "role": "developer"}] + MESSAGES[1:]
    assert tok.apply_chat_template(developer) == tok.apply_chat_template(MESSAGES)
    strict = Tokenizer(tok.hf, chat_template=(
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"))
    text = strict.apply_chat_template([{"role": "developer", "content": "Be terse."},
                                       {"role": "user", "content": "hi"}])
    assert text == "[system] Be terse.\n[user] hi\n"


def test_chat_template_override(tmp_path: Path) -> None:
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok = load_tokenizer(ModelConfig(chat_template=literal))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"
    path = tmp_path / "template.jinja"
    path.write_text("{{ messages[0]['content'] | upper }}")
    tok = load_tokenizer(ModelConfig(chat_template=str(path)))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "HI"


def test_named_chat_templates_tool_use_for_requests_with_tools(tmp_path: Path) -> None:
    """tokenizer_config.json's chat_template as a list of named templates (Hermes 2 Pro's
    "default" and "tool_use"): a request with tools renders "tool_use", as transformers picks
    it; before, heron rendered "default", which has no tools, so the model never saw them."""
    import json

    from tests.tiny_models import save_char_tokenizer

    save_char_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()  # it would take precedence
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "model_type": "llama"}))
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = [
        {"name": "default", "template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
        {"name": "tool_use", "template": "{{ tools | map(attribute='function.name') | join(',') }}"
                                         "|{% for m in messages %}{{ m['content'] }}{% endfor %}"}]
    config_file.write_text(json.dumps(config))
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = load_tokenizer(ModelConfig(model=str(tmp_path)))
    assert tok.apply_chat_template(messages, tools=tools) == "get_time|hi" == (
        reference.apply_chat_template(messages, tools=tools, tokenize=False))
    assert tok.apply_chat_template(messages) == "hi" == (
        reference.apply_chat_template(messages, tokenize=False))
    override = "[{{ messages[0]['content'] }}]"
    literal = load_tokenizer(ModelConfig(model=str(tmp_path), chat_template=override))
    assert literal.apply_chat_template(messages, tools=tools) == "[hi]"  # --chat-template wins


def test_chat_template_path_that_does_not_exist() -> None:
    with pytest.raises(ValueError, match="cannot be read"):
        read_chat_template("/no/such/template.jinja")


def test_missing_chat_template_is_a_clear_error(tok: Tokenizer) -> None:
    bare = Tokenizer(tok.hf, chat_template=None, name="my-model")
    with pytest.raises(ValueError, match="'my-model' has no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_errors_are_value_errors(tok: Tokenizer) -> None:
    raising = Tokenizer(tok.hf, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        raising.apply_chat_template([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------- against transformers


VARIED_TEXTS = [
    "Hello world", " Hello world", "  two leading spaces", "trailing spaces   ", " ", "   ", "",
    "tab\tseparated\tvalues\n", "line one\nline two\n\nline four\r\nwindows\r\n", "\n\n\n\n\n",
    " \n \n", "a" * 120, " " * 40 + "x", "\n" * 33, "word" + " " * 7 + "word",
    "héllo 😀 你好世界 🧌 ꙮ", "日本語のテキストです。カタカナとひらがな", "한국어 문장입니다",
    "Привет, как дела?", "مرحبا بالعالم", "नमस्ते दुनिया", "Ελληνικά κείμενα", "עברית",
    "👨‍👩‍👧‍👦 family, 🇫🇷 flag, 👍🏽 skin tone", "e\u0301 combining, \u00a0nbsp, zero\u200bwidth",
    "rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ᚠᚢᚦ 𓀀 \ue000 private", "control \x00\x01\x7f chars",
    "def f(x):\n\treturn {'a': [1, 2]}  # ok\n", "<html><body class=\"x\">&amp; &lt;</body></html>",
    '{"key": [1, 2.5e-3, null, true], "k2": "v"}', "https://example.com/path?q=1&r=%20#frag",
    "∑ x² ≤ ∞, ∀ε>0 ∃δ", "1234567890 3.14159 -42 1e10 0x1F",
    "<bos>literal bos", "x<eos>y", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<pad><unk><mask>", "<unused0> and <unused6241>", "[multimodal]", "<start_of_image>",
    "<end_of_turn>\n", "<start_of_turn> user", "text<start_of_turn>", "<start_of_turn",
]


def _random_texts(count: int, seed: int) -> list[str]:
    """Random strings over a mix of scripts, symbols, spaces and markup-like pieces."""
    pools = ["abcXYZ ", "     \n\t", "äöüéèçñ", "你好世界中文字", "ひらがなカタカナ", "😀🧌👍🏽🇫🇷",
             "ꙮ𝔘ᚠ𓀀", "<>{}[]()=+-*/#&%$@!?.,;:'\"", "0123456789", "▁_~^`|\\"]
    pieces = ["<start_of_turn>", "<end_of_turn>", "<bos>", "\n\n", "  ", "the ", "ing "]
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = [rng.choice(pieces) if rng.random() < 0.1 else
                 "".join(rng.choices(rng.choice(pools), k=rng.randint(1, 8)))
                 for _ in range(rng.randint(1, 12))]
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="module")
def reference() -> transformers.PreTrainedTokenizerBase:
    path = locate_default_model().path
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def built_and_reloaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tokenizer]:
    """The default tokenizer built from the GGUF into an empty cache, then reloaded from it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HERON_CACHE_DIR", str(tmp_path_factory.mktemp("heron-cache")))
        built = load_tokenizer(ModelConfig())
        return {"built": built, "reloaded": load_tokenizer(ModelConfig())}


@pytest.fixture(params=["built", "reloaded"])
def fresh(request: pytest.FixtureRequest, built_and_reloaded: dict[str, Tokenizer]) -> Tokenizer:
    return built_and_reloaded[request.param]


@pytest.mark.slow
def test_same_tokenizer_as_transformers(fresh: Tokenizer, reference: transformers.PreTrainedTokenizerBase) -> None:
    """The whole backend (vocabulary, 515k merges in order, normalizer, pre-tokenizer, decoder,
    added tokens, post-processor) serializes identically; specials and settings agree."""
    assert fresh.hf.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
    assert fresh.vocab_size == len(reference) == 262144
    assert fresh.hf.special_tokens_map == reference.special_tokens_map
    assert fresh.special_token_ids == Tokenizer(reference).special_token_ids
    assert fresh.bos_token_id == reference.bos_token_id == 2


@pytest.mark.slow
@pytest.mark.parametrize("sample", ["varied", "random"])
def test_same_ids_and_text_as_transformers(fresh: Tokenizer, reference: transformers.PreTrainedTokenizerBase,
                                           sample: str) -> None:
    texts = VARIED_TEXTS if sample == "varied" else _random_texts(300, seed=7)
    for text in texts:
        ids = reference.encode(text)
        assert fresh.encode(text) == ids, text
        assert fresh.encode(text, add_special_tokens=False) == reference.encode(
            text, add_special_tokens=False), text
        for skip in (True, False):
            assert fresh.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False), text
    rng = random.Random(3)  # arbitrary id runs: byte-fallback pieces, specials, whitespace tokens
    for _ in range(200):
        ids = [rng.randrange(262144) if rng.random() < 0.5 else rng.randrange(300)
               for _ in range(rng.randint(1, 16))]
        assert fresh.decode(ids, skip_special_tokens=False) == reference.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), ids
        assert fresh.token_strings(ids) == [reference.decode([i]) for i in ids]


@pytest.mark.slow
def test_chat_template_tokens_are_single_tokens(fresh: Tokenizer) -> None:
    prompt = fresh.apply_chat_template([{"role": "user", "content": "  hi\n"}])
    ids = fresh.encode(prompt, add_special_tokens=False)
    assert ids[:3] == [2, 105, 2364]  # <bos> <start_of_turn> user
    assert ids.count(105) == 2 and ids.count(106) == 1  # two turns opened, one closed


def test_gemma_vocabulary_with_tokenizer_json_merges(tok: Tokenizer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A Gemma 3 GGUF converted from a directory with tokenizer.json alone: llama.cpp writes its
    vocabulary as type "gemma4" with tokenizer.json's merges (no tokenizer.model to read), no
    space prefix, BOS added. heron builds the tokenizer of the SentencePiece file from it (the
    default model's, held to transformers above); before, transformers' GGUF path built it and
    failed ("Error while initializing BPE: Token `▁▁` out of vocabulary")."""
    import gguf

    from heron.loader.gguf import GGUFModel
    from heron.loader.gguf_file import GGUFFile
    from heron.tokenizer.load import gguf_tokenizer

    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path / "cache"))
    source = GGUFFile.read(locate_default_model().path).metadata
    merges = json.loads(tok.hf.backend_tokenizer.to_str())["model"]["merges"]
    writer = gguf.GGUFWriter(str(tmp_path / "gemma4-vocab.gguf"), "gemma3")
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(source["tokenizer.ggml.tokens"])
    writer.add_token_scores(source["tokenizer.ggml.scores"].tolist())
    writer.add_token_types(source["tokenizer.ggml.token_type"].tolist())
    writer.add_token_merges([" ".join(merge) for merge in merges])
    for key in ("bos", "eos", "unknown", "padding"):
        name = f"tokenizer.ggml.{key}_token_id"
        writer.add_uint32(name, int(source[name]))
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    built = gguf_tokenizer(GGUFModel(tmp_path / "gemma4-vocab.gguf"))
    for text in VARIED_TEXTS + TEXTS + _random_texts(50, seed=7):
        ids = tok.hf.encode(text)
        assert built.encode(text) == ids, text
        assert built.decode(ids) == tok.hf.decode(ids), text
