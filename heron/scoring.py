"""Scoring two texts against each other (``/v1/score``, ``/v1/rerank``, ``LLM.score``).

What a score is depends on the model::

    cross-encoder  a sequence-classification head (``score.weight`` [num_labels, hidden]) on
                   the last token's final hidden state of the pair, joined as the tokenizer
                   pairs them: 1 label -> sigmoid(logit); 2 labels -> softmax(logits)[1]
    LLM reranker   a causal LM judged by two tokens of its LM head (Qwen3-Reranker: "no",
                   "yes"): the head is the one row lm_head[yes] - lm_head[no], so the score
                   sigmoid(logit_yes - logit_no) is softmax([logit_no, logit_yes])[1]
    any other      the cosine similarity of the two texts' embeddings (``--pooling``)

The LLM reranker is what vLLM's ``--hf-overrides`` asks for; heron takes the same JSON,
limited to the keys that make a reranker (``HFOverrides``). This module holds no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

# A causal LM family heron serves -> the sequence-classification architecture of the family.
SEQUENCE_CLASSIFIERS = {
    "LlamaForCausalLM": "LlamaForSequenceClassification",
    "MistralForCausalLM": "MistralForSequenceClassification",
    "Qwen2ForCausalLM": "Qwen2ForSequenceClassification",
    "Qwen3ForCausalLM": "Qwen3ForSequenceClassification",
}
_KEYS = ("architectures", "classifier_from_token", "is_original_qwen3_reranker", "method")
_TWO_WAY = "from_2_way_softmax"


@dataclass(frozen=True)
class HFOverrides:
    """``--hf-overrides`` as heron reads it: a causal LM served as a reranker whose one label
    is ``lm_head[true_token] - lm_head[false_token]`` (vLLM's ``from_2_way_softmax``).
    ``architecture``: the sequence-classification name it is served as."""

    architecture: str
    false_token: str
    true_token: str

    @staticmethod
    def parse(text: str | None) -> HFOverrides | None:
        """The JSON object of ``--hf-overrides`` (None: not given); ValueError naming what
        heron does not take."""
        if text is None or not text.strip():
            return None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--hf-overrides is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError("--hf-overrides must be a JSON object")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ValueError(f"--hf-overrides: heron takes only the keys {', '.join(_KEYS)} "
                             f"(a causal LM served as a reranker); got {', '.join(unknown)}")
        return HFOverrides._of(raw)

    @staticmethod
    def _of(raw: dict[str, object]) -> HFOverrides:
        architectures = raw.get("architectures")
        if (not isinstance(architectures, list) or len(architectures) != 1
                or architectures[0] not in SEQUENCE_CLASSIFIERS.values()):
            raise ValueError("--hf-overrides: architectures must be one of "
                             f"{sorted(SEQUENCE_CLASSIFIERS.values())} (a list of one), "
                             f"got {architectures!r}")
        tokens = raw.get("classifier_from_token")
        if (not isinstance(tokens, list) or len(tokens) != 2
                or not all(isinstance(t, str) and t for t in tokens)):
            raise ValueError("--hf-overrides: classifier_from_token must be two tokens, "
                             f"[false, true] (such as [\"no\", \"yes\"]), got {tokens!r}")
        two_way = raw.get("is_original_qwen3_reranker") is True or raw.get("method") == _TWO_WAY
        if not two_way:
            raise ValueError("--hf-overrides: heron serves classifier_from_token as "
                             f"{_TWO_WAY} only: set \"is_original_qwen3_reranker\": true "
                             f"or \"method\": \"{_TWO_WAY}\"")
        return HFOverrides(str(architectures[0]), tokens[0], tokens[1])

    def check_family(self, architectures: list[str]) -> None:
        """ValueError unless the checkpoint is the causal LM of ``architecture``'s family."""
        family = [a for a in architectures if SEQUENCE_CLASSIFIERS.get(a) == self.architecture]
        if not family:
            raise ValueError(f"--hf-overrides serves the model as {self.architecture}, but the "
                             f"checkpoint is {architectures}; heron turns a causal LM of the "
                             "same family into a reranker")


def pair_texts(text_1: str | list[str], text_2: str | list[str]) -> list[tuple[str, str]]:
    """vLLM's pairing: one text against each of the others (either side may be the one), or
    two lists of the same length zipped. ValueError naming the side that does not fit."""
    firsts = [text_1] if isinstance(text_1, str) else list(text_1)
    seconds = [text_2] if isinstance(text_2, str) else list(text_2)
    for name, texts in (("text_1", firsts), ("text_2", seconds)):
        if not texts:
            raise ValueError(f"{name} must not be empty")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    elif len(seconds) == 1:
        seconds = seconds * len(firsts)
    if len(firsts) != len(seconds):
        raise ValueError(f"text_1 holds {len(firsts)} texts and text_2 {len(seconds)}: give one "
                         "text on a side, or as many on both")
    return list(zip(firsts, seconds))


def score_of(logits: list[float]) -> float:
    """A cross-encoder's classifier logits -> its score, as vLLM scores: sigmoid of the one
    logit; for two labels the probability of label 1 (softmax). ValueError for more."""
    if len(logits) == 1:
        return _sigmoid(logits[0])
    if len(logits) == 2:
        return _sigmoid(logits[1] - logits[0])
    raise ValueError(f"a classifier with {len(logits)} labels gives no single score")


def check_scorable(num_labels: int) -> None:
    """ValueError unless a model of ``num_labels`` (0: no classification head) can score."""
    if num_labels > 2:
        raise ValueError(f"this model classifies into {num_labels} labels, which give no single "
                         "relevance score; scoring needs a head of 1 or 2 labels")


def cosine(a: list[float], b: list[float]) -> float:
    """The cosine similarity of two vectors."""
    dot = sum(x * y for x, y in zip(a, b))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / max(norms, 1e-12)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
