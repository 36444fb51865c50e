"""GGUF rerankers: a file with ``<arch>.pooling_type`` RANK and its head as ``cls.output.weight``
(as llama.cpp's converter writes Qwen3-Reranker) scores as llama.cpp scores it, against
transformers' sequence-classification model on the same weights.

llama.cpp's score (``build_pooling``, RANK): the last token's final hidden state through
``cls.output``; for Qwen3 the softmax of those outputs, and ``/v1/rerank`` returns the first.
Two rows [yes, no]: ``softmax(logits)[0]``. heron's 1-label head: vLLM's ``sigmoid(logit)``.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from heron.llm import LLM
from heron.loader.gguf import GGUFModel
from heron.loader.gguf_arch import rank_head_name
from heron.loader.gguf_file import GGUFFile
from tests.gguf_files import RankHead, synthetic_vocab, write_gguf
from tests.tiny_models import VOCAB, _tiny_config, _widen

QUERY = "w1 w2 w3"
DOCS = ["w4 w5", "w6 w7 w8 w9", "w3 w1", "w10"]
YES, NO = 300, 301  # two pieces of the synthetic vocabulary


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path / "heron-cache"))


def _classifier(family: str, num_labels: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = _tiny_config(family, num_labels=num_labels, tie_word_embeddings=True)
    model = transformers.AutoModelForSequenceClassification.from_config(
        config, dtype=torch.float32)
    _widen(model, head_std=0.15)
    return model.eval()


def _scores(path: Path) -> tuple[list[float], list[list[int]]]:
    llm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB")
    assert llm.engine.info.num_labels == 1  # two rows fold into one
    out = llm.score(QUERY, DOCS, use_tqdm=False)
    return [o.outputs.score for o in out], [list(o.prompt_token_ids) for o in out]


def _hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]  # [num_labels]


def _dequantized(rows: np.ndarray, block_format: str | None) -> torch.Tensor:
    if block_format is None:
        return torch.from_numpy(rows)
    qtype = gguf.GGMLQuantizationType[block_format]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(rows, qtype), qtype))


@pytest.mark.parametrize("block_format", [None, "Q8_0"])
def test_qwen3_reranker_file_scores_the_first_of_its_softmax(
        tmp_path: Path, block_format: str | None) -> None:
    """Qwen3-Reranker as the converter writes it: the LM head rows of "yes" and "no" as
    ``cls.output.weight``, labels ["yes", "no"]. heron's score is llama.cpp's:
    softmax(logits)[0] of transformers' 2-label classifier with that head."""
    model = _classifier("qwen3", 2)
    embed = model.model.embed_tokens.weight.detach()  # the tied LM head
    rows = embed[[YES, NO]].numpy().copy()
    path = write_gguf(tmp_path / "reranker.gguf", model, synthetic_vocab(VOCAB),
                      rank_head=RankHead(rows, ("yes", "no"), block_format))
    got, prompts = _scores(path)
    with torch.no_grad():
        model.score.weight.copy_(_dequantized(rows, block_format))
    want = [float(torch.softmax(_hf_logits(model, ids), dim=0)[0]) for ids in prompts]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert max(want) - min(want) > 1e-2  # the documents get different scores
    causal = transformers.Qwen3ForCausalLM(model.config).eval()  # the same as yes/no logits
    causal.model.load_state_dict(model.model.state_dict())
    with torch.inference_mode():
        logits = causal(torch.tensor([prompts[0]])).logits[0, -1]
    if block_format is None:
        assert got[0] == pytest.approx(float(torch.softmax(logits[[YES, NO]], 0)[0]), abs=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_one_label_classifier_file_scores_the_sigmoid(tmp_path: Path, family: str) -> None:
    """A 1-label sequence classifier's ``score.weight`` as ``cls.output.weight``: heron's score
    is vLLM's sigmoid of the logit (llama.cpp softmaxes one value to 1.0), llama's q/k rows
    permuted in the file as the converter does."""
    model = _classifier(family, 1)
    path = write_gguf(tmp_path / "classifier.gguf", model, synthetic_vocab(VOCAB),
                      rank_head=RankHead(model.score.weight.detach().numpy().copy()))
    got, prompts = _scores(path)
    want = [float(torch.sigmoid(_hf_logits(model, ids)[0])) for ids in prompts]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert max(want) - min(want) > 1e-2
    assert prompts[0][0] == 1  # <s>, then the two texts
    assert len(prompts[1]) > len(prompts[3])


def test_reranker_file_still_generates_and_reports_no_unused_head(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _classifier("qwen3", 2)
    rows = model.model.embed_tokens.weight.detach()[[YES, NO]].numpy().copy()
    path = write_gguf(tmp_path / "reranker.gguf", model, synthetic_vocab(VOCAB),
                      rank_head=RankHead(rows, ("yes", "no")))
    with caplog.at_level("WARNING", logger="heron.loader.gguf"):
        llm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB")
    assert not [r for r in caplog.records if "not used" in r.getMessage()]
    out = llm.generate("w1", use_tqdm=False)[0].outputs[0]
    assert out.token_ids


def _file(tmp_path: Path, rank_head: RankHead | None, extra: dict[str, np.ndarray]) -> Path:
    import tests.gguf_files as files

    model = _classifier("qwen3", 1)
    written = files._tensors
    files._tensors = lambda m, arch: written(m, arch) + list(extra.items())  # type: ignore[assignment]
    try:
        return write_gguf(tmp_path / "odd.gguf", model, synthetic_vocab(VOCAB), rank_head=rank_head)
    finally:
        files._tensors = written


def test_head_is_read_only_where_the_pooling_type_is_rank(tmp_path: Path) -> None:
    """The cached config records llama.cpp's pooling type (the engine opens the file for the
    head only where it is RANK)."""
    plain = _file(tmp_path, None, {"cls.output.weight": np.zeros((1, 64), np.float32)})
    assert rank_head_name(GGUFFile.read(plain)) is None
    llm = LLM(str(plain), dtype="float32", kv_cache_memory="16MiB")
    assert llm.engine.info.num_labels == 0
    assert llm.engine.hf_config.gguf_pooling_type == 0
    ranked = _file(tmp_path, RankHead(np.ones((1, 64), np.float32)), {})
    assert GGUFModel(ranked).config().gguf_pooling_type == 4


@pytest.mark.parametrize(("extra", "message"), [
    ({"cls.weight": np.zeros((64, 64), np.float32)},
     "this qwen3 reranker's head has cls.weight, which llama.cpp does not read for qwen3 and "
     "heron does not serve: only cls.output.weight"),
    ({"cls.output.bias": np.zeros(1, np.float32)}, "head has cls.output.bias"),
])
def test_heads_heron_does_not_run_are_refused(tmp_path: Path, extra: dict[str, np.ndarray],
                                              message: str) -> None:
    path = _file(tmp_path, RankHead(np.zeros((1, 64), np.float32)), extra)
    with pytest.raises(ValueError, match=message):
        rank_head_name(GGUFFile.read(path))


def test_rank_file_without_a_head_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, RankHead(None), {})
    with pytest.raises(ValueError, match="the file's pooling type is RANK \\(a reranker\\) but it "
                                         "has no cls.output.weight tensor to score with"):
        rank_head_name(GGUFFile.read(path))


def test_head_of_another_width_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, RankHead(np.zeros((1, 32), np.float32)), {})
    with pytest.raises(ValueError, match="the file's rerank head is \\[1, 32\\], not "
                                         "\\[num_labels, 64\\]"):
        LLM(str(path), dtype="float32", kv_cache_memory="16MiB")
