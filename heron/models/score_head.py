"""Sequence-classification heads: the cross-encoders and rerankers of ``heron.scoring``.

A ``*ForSequenceClassification`` checkpoint is its family's decoder stack and ``score.weight``
[num_labels, hidden] in place of the LM head::

    checkpoint                      model
    model.*                     ->  the causal LM's backbone (its LM head tied, never used)
    score.weight                ->  score.weight (``ScoreHead``)

A causal LM served as a reranker (``--hf-overrides``) keeps its LM head and gains a
``ScoreHead`` of one row, ``lm_head[true] - lm_head[false]`` (``two_token_head``): the two
logits it compares, without projecting on the whole vocabulary.

A GGUF reranker (``<arch>.pooling_type`` RANK) brings its head as ``cls.output.weight``: the
causal LM gains a ``ScoreHead`` of it (``file_rank_head``). llama.cpp's converter writes
Qwen3-Reranker's as the two rows ``[lm_head[yes], lm_head[no]]``, and llama.cpp's rerank score
is the first of their softmax: the head becomes the one row ``row0 - row1``, whose sigmoid that is.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import torch
from torch import nn

from heron.layers.score import ScoreHead
from heron.models.base import CausalLM


class SequenceClassifier:
    """Builds ``base`` (a heron causal LM class) for its family's sequence-classification
    checkpoint: tied LM head (the checkpoint has none), a ``score`` head, no generation."""

    def __init__(self, module: str, base: str) -> None:
        self.module = module
        self.base = base

    def __call__(self, config: Any) -> CausalLM:
        cls = getattr(importlib.import_module(self.module), self.base)
        tied = copy.copy(config)
        tied.tie_word_embeddings = True  # the head weighs nothing and loads nothing
        model: CausalLM = cls(tied)
        model.score = ScoreHead(int(config.num_labels), int(config.hidden_size))
        model.generates = False
        return model


LLAMA = SequenceClassifier("heron.models.llama", "LlamaForCausalLM")
MISTRAL = SequenceClassifier("heron.models.llama", "MistralForCausalLM")
QWEN2 = SequenceClassifier("heron.models.llama", "Qwen2ForCausalLM")
QWEN3 = SequenceClassifier("heron.models.llama", "Qwen3ForCausalLM")


def two_token_head(model: CausalLM, false_id: int, true_id: int) -> ScoreHead:
    """One row, ``lm_head[true_id] - lm_head[false_id]`` in float32 (of the quantized rows
    where the head is quantized): its logit is ``logit_true - logit_false``."""
    lm_head = model.lm_head
    ids = torch.tensor([true_id, false_id], device=lm_head.weight.device)
    if lm_head.quantized is not None:
        rows = lm_head.quantized.rows(ids, torch.float32)  # [2, hidden]
    else:
        rows = lm_head.weight.detach()[ids].float()
    if lm_head.softcap is not None:
        raise ValueError("a soft-capped LM head's logits are no linear function of the hidden "
                         "state: it cannot be turned into a score head")
    head = ScoreHead(1, int(rows.shape[1]))
    head.weight = nn.Parameter((rows[0] - rows[1])[None, :].to(torch.float32),
                               requires_grad=False)
    return head


def file_rank_head(rows: torch.Tensor, hidden_size: int) -> ScoreHead:
    """A GGUF reranker's head ``rows`` [num_labels, hidden] as a ``ScoreHead``: two rows fold
    into ``rows[0] - rows[1]`` (sigmoid of its logit = softmax(logits)[0], llama.cpp's score);
    other counts are kept as they are. ValueError for rows of another width than the model's."""
    if rows.dim() != 2 or rows.shape[1] != hidden_size:
        raise ValueError(f"the file's rerank head is {list(rows.shape)}, not [num_labels, "
                         f"{hidden_size}] for this model's hidden size")
    rows = rows.detach().float()
    if rows.shape[0] == 2:
        rows = (rows[0] - rows[1])[None, :]
    head = ScoreHead(int(rows.shape[0]), int(rows.shape[1]))
    head.weight = nn.Parameter(rows.contiguous(), requires_grad=False)
    return head
