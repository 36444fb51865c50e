"""The grammar index built from token bytes (``heron.engine.grammar_vocab``) is llguidance's own
index of the same tokenizer.json: every token's bytes and special flag, the eos ids, the ids
padded past the tokenizer, and the masks of several grammars along seeded random walks."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import llguidance
import pytest
from tokenizers import Tokenizer

from heron.bench import procmem
from heron.engine.forced_text import EncoderProcess
from heron.engine.grammar_vocab import index_tokenizer_file
from heron.loader.default_model import default_gguf_path
from heron.loader.gguf_file import GGUFFile
from heron.structured.grammar import grammar_text
from heron.structured.params import StructuredOutputsParams as S
from heron.tokenizer.gguf_vocab import build_gguf_tokenizer
from heron.tokenizer.load import save_tokenizer
from heron.tokenizer.token_bytes import read_token_bytes, token_bytes

DATA = Path(__file__).parent / "data"
PADDING = 3  # model ids past the tokenizer's, as models with a rounded-up embedding have
SPECS = [
    S.json_object(),
    S.json_schema({"type": "object", "properties": {"name": {"type": "string"},
                                                    "age": {"type": "integer"}},
                   "required": ["name", "age"]}),
    S.regex(r"[a-z]+ \d{3}-[A-Z]{2}"),
    S.choice(["yes", "no", "maybe later", "\u00fcber", "\u65e5\u672c"]),
    S.grammar('start: "Answer: " ("yes" | "no") "\\n"'),
    S.regex(r"(?s:.{0,20})"),
]


@pytest.fixture(scope="module", params=["llama-spm", "qwen2", "llama-spm+bytes", "qwen2+bytes"])
def tokenizer_json(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tokenizer.json heron writes for a GGUF vocabulary: SentencePiece with byte fallback
    (a Prepend normalizer in a sequence) or byte-level BPE; "+bytes": with the token bytes the
    API process writes beside it (then the index reads those, not the JSON)."""
    vocab, _, with_bytes = request.param.partition("+")
    built = build_gguf_tokenizer(GGUFFile.read(DATA / f"ggml-vocab-{vocab}.gguf"))
    assert built is not None
    directory = tmp_path_factory.mktemp(vocab)
    if with_bytes:
        save_tokenizer(built, directory)
        assert read_token_bytes(directory) is not None
    else:
        built.save_pretrained(str(directory))
        assert read_token_bytes(directory) is None
    return directory / "tokenizer.json"


@pytest.mark.parametrize("vocab", ["llama-spm", "qwen2"])
def test_saved_token_bytes_are_those_of_the_saved_tokenizer(vocab: str, tmp_path: Path) -> None:
    built = build_gguf_tokenizer(GGUFFile.read(DATA / f"ggml-vocab-{vocab}.gguf"))
    assert built is not None
    save_tokenizer(built, tmp_path)
    saved = read_token_bytes(tmp_path)
    assert saved is not None
    assert saved == token_bytes(Tokenizer.from_file(str(tmp_path / "tokenizer.json")))


def _indexes(path: Path) -> tuple[llguidance.LLTokenizer, llguidance.LLTokenizer, list[int]]:
    size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True) + PADDING
    eos = [2, 1]
    theirs = llguidance.LLTokenizer(path.read_text(), n_vocab=size, eos_token=eos)
    return theirs, index_tokenizer_file(path, size, eos)[0], eos


def test_same_tokens_specials_and_eos(tokenizer_json: Path) -> None:
    theirs, ours, eos = _indexes(tokenizer_json)
    assert ours.vocab_size == theirs.vocab_size
    assert ours.eos_tokens == theirs.eos_tokens == eos
    differing = [i for i in range(theirs.vocab_size)
                 if ours.decode_bytes([i]) != theirs.decode_bytes([i])
                 or ours.is_special_token(i) != theirs.is_special_token(i)]
    assert differing == []
    assert sum(ours.is_special_token(i) for i in range(ours.vocab_size)) > PADDING


def test_same_masks_along_random_walks(tokenizer_json: Path) -> None:
    theirs, ours, _ = _indexes(tokenizer_json)
    rng = random.Random(0)
    for spec in SPECS:
        grammar = grammar_text(spec)
        for _ in range(2):
            a, b = llguidance.LLMatcher(theirs, grammar), llguidance.LLMatcher(ours, grammar)
            assert not a.is_error() and not b.is_error()
            assert a.compute_ff_tokens() == b.compute_ff_tokens()  # tokenizes forced text
            for _ in range(30):
                mask = a.compute_bitmask()
                assert b.compute_bitmask() == mask, spec.describe()
                allowed = [t for t in range(theirs.vocab_size) if mask[t // 8] >> (t % 8) & 1]
                if not allowed or a.is_stopped():
                    break
                token = rng.choice(allowed)
                assert a.consume_token(token) == b.consume_token(token)
                assert a.is_stopped() == b.is_stopped()


def test_forced_text_is_encoded_like_llguidance(tokenizer_json: Path) -> None:
    theirs, ours, _ = _indexes(tokenizer_json)
    for text in ("Answer: yes", " hello world", "{\"name\": ", "\u00fcber 12"):
        assert ours.tokenize_str(text) == theirs.tokenize_str(text), text


def test_needs_eos_ids(tokenizer_json: Path) -> None:
    with pytest.raises(ValueError, match="eos"):
        index_tokenizer_file(tokenizer_json, 10**6, [])


def test_encoder_process_starts_for_the_first_forced_text(tokenizer_json: Path) -> None:
    size = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)
    index, vocabulary = index_tokenizer_file(tokenizer_json, size, [2])
    assert vocabulary.encoder.pid is None  # the index holds the trie, no tokenizer, no process
    theirs = llguidance.LLTokenizer(tokenizer_json.read_text(), n_vocab=size, eos_token=[2])
    try:
        for text in ("Answer: yes", " a\nb \u00fc\u65e5", ""):
            assert index.tokenize_str(text) == theirs.tokenize_str(text), text
        pid = vocabulary.encoder.pid
        assert pid is not None and pid != os.getpid()
        assert procmem.process_label(pid, os.getpid()) == "grammar encoder"  # bench peers' split
        index.tokenize_str("again")
        assert vocabulary.encoder.pid == pid  # started once
    finally:
        vocabulary.encoder.close()
    assert vocabulary.encoder.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # closed: the process is gone (and reaped)


def test_encoder_process_that_cannot_load_says_so(tmp_path: Path) -> None:
    broken = EncoderProcess(tmp_path / "missing.json")
    with pytest.raises(RuntimeError, match="missing.json ended"):
        broken("text")
    assert broken.pid is None


# Kept by the default model's index (262,144 tokens), measured after trimming the heap: 232 MiB
# when the index held its tokenizer for encoding, 114 MiB with the trie and its slices alone.
DEFAULT_INDEX_BOUND_MIB = 150
PEAK_BOUND_MIB = 250
# The transient heap while it builds: +362 MiB parsing tokenizer.json, +128 MiB reading the token
# bytes file instead. The encoder process: 308 MiB before it trimmed its heap, 114 after.
_MEASURE = """
import sys
from pathlib import Path
from heron.engine.grammar_vocab import index_tokenizer_file
from heron.heap import release_free_heap

def status(key, pid="self"):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024

def rss(pid="self"):
    release_free_heap()
    return status("VmRSS", pid)

before = rss()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
index, vocabulary = index_tokenizer_file(Path(sys.argv[1]), 262144, [1, 106])
peak = status("VmHWM") - before
built = rss()
index.tokenize_str("Answer: yes")
print(built - before, peak, rss() - built, rss(vocabulary.encoder.pid))
vocabulary.encoder.close()
"""


@pytest.fixture(scope="module")
def default_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's tokenizer folder as its first start writes it (with token bytes)."""
    built = build_gguf_tokenizer(GGUFFile.read(Path(default_gguf_path())))
    assert built is not None
    directory = tmp_path_factory.mktemp("default-tokenizer")
    save_tokenizer(built, directory)
    return directory


def _measure(tokenizer_json: Path) -> tuple[float, ...]:
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(tokenizer_json)],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    return tuple(float(x) for x in result.stdout.split())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/*/status")
@pytest.mark.parametrize("with_bytes", [True, False])
def test_default_model_index_keeps_only_the_trie(default_tokenizer: Path, tmp_path: Path,
                                                 with_bytes: bool) -> None:
    directory = default_tokenizer
    if not with_bytes:  # a cache written before the token bytes file, or an HF model folder
        directory = tmp_path
        shutil.copy(default_tokenizer / "tokenizer.json", directory / "tokenizer.json")
    kept, peak, after_encoding, encoder = _measure(directory / "tokenizer.json")
    assert kept < DEFAULT_INDEX_BOUND_MIB, f"the index keeps {kept:.0f} MiB"
    assert after_encoding < 5, "encoding grew the engine's side"
    assert 50 < encoder < 150, f"the encoder process holds {encoder:.0f} MiB"  # the tokenizer
    if with_bytes:
        assert peak < PEAK_BOUND_MIB, f"building the index peaked at +{peak:.0f} MiB"
    else:
        assert peak > PEAK_BOUND_MIB  # the measurement sees the JSON parse where it happens
