"""Scores of two texts (``LLM.score``; the routes in test_server_score.py) against transformers,
on tiny random checkpoints: sequence classifiers of 1 and 2 labels (the last token's final
hidden state through ``score.weight``), a causal LM served as a reranker by two tokens of its
head (``--hf-overrides``), and the cosine of two embeddings for any other model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from heron.config import ModelConfig
from heron.llm import LLM
from heron.scoring import HFOverrides, pair_texts, score_of
from tests.tiny_models import save_tiny_classifier, save_tiny_qwen3, save_tiny_server_model

QUERY = "what is a heron?"
DOCS = ["A heron is a long-legged bird.", "Paris is in France.", "herons wade in water",
        "x"]
RERANKER = {"architectures": ["Qwen3ForSequenceClassification"],
            "classifier_from_token": ["n", "y"], "is_original_qwen3_reranker": True}


def _llm(path: Path, **kw: object) -> LLM:
    return LLM(str(path), dtype="float32", kv_cache_memory="16MiB", **kw)  # type: ignore[arg-type]


def _hf_pair_ids(path: Path, a: str, b: str) -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return list(tokenizer(a, b)["input_ids"])


def _hf_classifier_score(path: Path, a: str, b: str) -> float:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([_hf_pair_ids(path, a, b)])).logits[0]  # [num_labels]
    if logits.shape[0] == 1:
        return float(torch.sigmoid(logits[0]))
    return float(torch.softmax(logits, dim=0)[1])


@pytest.mark.parametrize(("family", "num_labels"), [("qwen3", 1), ("llama", 1), ("llama", 2)])
def test_sequence_classifier_scores_match_transformers(
        tmp_path: Path, family: str, num_labels: int) -> None:
    path = save_tiny_classifier(tmp_path, family, num_labels)
    llm = _llm(path)
    assert llm.engine.info.num_labels == num_labels
    got = llm.score(QUERY, DOCS, use_tqdm=False)
    want = [_hf_classifier_score(path, QUERY, d) for d in DOCS]
    np.testing.assert_allclose([o.outputs.score for o in got], want, atol=1e-5, rtol=0)
    assert max(want) - min(want) > 1e-2  # the pairs get different scores
    # the pair is read as the tokenizer pairs it: <s> query </s> document
    assert got[0].prompt_token_ids == _hf_pair_ids(path, QUERY, DOCS[0])
    assert got[0].prompt_token_ids.count(2) == 1


def test_sequence_classifier_does_not_generate(tmp_path: Path) -> None:
    llm = _llm(save_tiny_classifier(tmp_path, "qwen3", 1))
    with pytest.raises(ValueError, match="sequence classifier: it scores"):
        llm.generate("hello", use_tqdm=False)


def test_causal_lm_reranker_scores_match_its_yes_no_softmax(tmp_path: Path) -> None:
    path = save_tiny_qwen3(tmp_path)
    llm = _llm(path, hf_overrides=RERANKER)
    assert llm.engine.info.num_labels == 1
    got = [o.outputs.score for o in llm.score(QUERY, DOCS, use_tqdm=False)]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    no, yes = tokenizer.convert_tokens_to_ids(["n", "y"])
    want = []
    for doc in DOCS:
        ids = tokenizer(QUERY, doc)["input_ids"]
        # no pair template: the two texts back to back, as Qwen's tokenizer joins them
        assert ids == tokenizer(QUERY + doc, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, -1]  # [vocab]
        want.append(float(torch.softmax(logits[[no, yes]], dim=0)[1]))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert max(want) - min(want) > 1e-3
    # still a language model: it generates
    assert llm.generate("hi", use_tqdm=False)[0].outputs[0].token_ids


def test_other_models_score_by_the_cosine_of_their_embeddings(tmp_path: Path) -> None:
    llm = _llm(save_tiny_server_model(tmp_path))
    assert llm.engine.info.num_labels == 0
    got = [o.outputs.score for o in llm.score([QUERY, DOCS[1]], [DOCS[0], DOCS[2]],
                                               use_tqdm=False)]
    vectors = {t: np.array(o.outputs.embedding) for t, o in zip(
        [QUERY, *DOCS], llm.embed([QUERY, *DOCS], use_tqdm=False))}
    want = [float(vectors[QUERY] @ vectors[DOCS[0]]), float(vectors[DOCS[1]] @ vectors[DOCS[2]])]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_pairing_follows_vllm() -> None:
    assert pair_texts("q", ["a", "b"]) == [("q", "a"), ("q", "b")]
    assert pair_texts(["a", "b"], "d") == [("a", "d"), ("b", "d")]
    assert pair_texts(["a", "b"], ["c", "d"]) == [("a", "c"), ("b", "d")]
    with pytest.raises(ValueError, match="text_1 holds 2 texts and text_2 3"):
        pair_texts(["a", "b"], ["c", "d", "e"])
    with pytest.raises(ValueError, match="text_2 must not be empty"):
        pair_texts("a", [])


def test_score_of_logits() -> None:
    assert score_of([0.0]) == 0.5
    assert score_of([2.0]) == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert score_of([1.0, 3.0]) == pytest.approx(float(torch.softmax(torch.tensor([1.0, 3.0]), 0)[1]))
    with pytest.raises(ValueError, match="3 labels gives no single score"):
        score_of([1.0, 2.0, 3.0])


@pytest.mark.parametrize(("overrides", "message"), [
    ({"architectures": ["Qwen3ForSequenceClassification"], "num_labels": 3},
     "heron takes only the keys .* got num_labels"),
    ({"architectures": ["BertForSequenceClassification"], "classifier_from_token": ["no", "yes"],
      "is_original_qwen3_reranker": True}, "architectures must be one of"),
    ({"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["yes"],
      "is_original_qwen3_reranker": True}, "classifier_from_token must be two tokens"),
    ({"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"]},
     "from_2_way_softmax only"),
])
def test_hf_overrides_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(hf_overrides=json.dumps(overrides))
    with pytest.raises(ValueError, match="not valid JSON"):
        HFOverrides.parse("{architectures")


def test_hf_overrides_of_another_family_refused(tmp_path: Path) -> None:
    path = save_tiny_server_model(tmp_path)  # a Llama
    with pytest.raises(ValueError, match="the checkpoint is \\['LlamaForCausalLM'\\]"):
        _llm(path, hf_overrides=RERANKER)


def test_classifier_of_three_labels_is_refused(tmp_path: Path) -> None:
    llm = _llm(save_tiny_classifier(tmp_path, "llama", 3))
    assert llm.engine.info.num_labels == 3
    with pytest.raises(ValueError, match="classifies into 3 labels, which give no single"):
        llm.score(QUERY, DOCS, use_tqdm=False)
    assert len(llm.embed(QUERY, use_tqdm=False)[0].outputs.embedding) == 64  # it still embeds
