"""What the runner may call on a model, and the ``*ForCausalLM`` part every family shares.

The contract (``CausalLM``)::

    forward(input_ids [T], positions [T], ctx) -> hidden [T, hidden]
    compute_logits(hidden [N, hidden])        -> logits [N, vocab] float32
    classify(pooled [hidden])                  -> logits [num_labels] float32 (``score`` head)
    num_layers, num_kv_heads, head_dim         the KV cache shape per layer
    weight_mapping                             checkpoint names -> parameter names (``WeightMapping``)
    prepare_decode(kv_caches) -> bool          the one-call decode step where it applies
    enable_lora() -> LoRASlot                  LoRA layers beside the projections (ctx.lora)

A model file holds only its architecture and its ``WeightMapping``; loading is generic
(``heron.loader.weights``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from heron.layers.attention import ForwardContext
from heron.layers.linear import LMHead
from heron.layers.lora import LoRASlot, attach_lora
from heron.layers.score import ScoreHead
from heron.models.fused_decode import FusedDecode


@dataclass(frozen=True)
class StackedParam:
    """Checkpoint module ``source`` is shard ``shard`` of the model's fused module ``target``."""

    target: str  # e.g. "qkv_proj"
    source: str  # e.g. "k_proj"
    shard: int


@dataclass(frozen=True)
class WeightMapping:
    """How a model's parameter names differ from its checkpoint's tensor names."""

    stacked: tuple[StackedParam, ...] = ()
    ignored: tuple[str, ...] = ()  # regexes of (renamed) checkpoint names to skip: a tied lm_head
    # (checkpoint prefix, parameter prefix): the first that starts a name renames it
    prefixes: tuple[tuple[str, str], ...] = ()

    def renamed(self, name: str) -> str:
        """``name`` with its prefix replaced where ``prefixes`` lists it."""
        for old, new in self.prefixes:
            if name.startswith(old):
                return new + name[len(old):]
        return name


QKV_STACKED = (StackedParam("qkv_proj", "q_proj", 0), StackedParam("qkv_proj", "k_proj", 1),
               StackedParam("qkv_proj", "v_proj", 2))
GATE_UP_STACKED = (StackedParam("gate_up_proj", "gate_proj", 0),
                   StackedParam("gate_up_proj", "up_proj", 1))

# A vision-language checkpoint's language model, in either layout transformers writes:
# ``language_model.model.*`` / ``language_model.lm_head.*`` (the published checkpoints, and what
# transformers 5 saves) or ``model.language_model.*`` / ``lm_head.*`` (transformers 4.52-4.57).
LANGUAGE_MODEL_PREFIXES = (("language_model.model.", "model."),
                           ("language_model.lm_head.", "lm_head."),
                           ("model.language_model.", "model."))
VISION_WEIGHTS = r"^(model\.)?(vision_tower|multi_modal_projector)\."


@dataclass(frozen=True)
class KVShape:
    """The KV cache a model needs: ``num_layers`` tensors of ``num_kv_heads`` x ``head_dim``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


class CausalLM(nn.Module):
    """A decoder stack (``backbone``, registered under the checkpoint's prefix) and an LM head.

    The head is tied to the backbone's ``embedding`` unless the config says otherwise
    (``tie_word_embeddings``, default ``tie_default``); a tied checkpoint's ``lm_head.weight``
    is ignored.
    """

    def __init__(self, config: Any, prefix: str, backbone: nn.Module, embedding: nn.Embedding,
                 kv: KVShape, *, hidden_size: int, tie_default: bool,
                 stacked: tuple[StackedParam, ...] = (), softcap: float | None = None) -> None:
        super().__init__()
        self.config = config
        self._prefix = prefix
        self.add_module(prefix, backbone)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", tie_default))
        self.lm_head = LMHead(hidden_size, config.vocab_size,
                              embedding if self.tie_word_embeddings else None, softcap=softcap)
        self.num_layers, self.num_kv_heads, self.head_dim = kv.num_layers, kv.num_kv_heads, kv.head_dim
        ignored = (r"^lm_head\.weight$",) if self.tie_word_embeddings else ()
        self.weight_mapping = WeightMapping(stacked=stacked, ignored=ignored)
        self.lora_slot: LoRASlot | None = None  # set by enable_lora
        # A classification head (``heron.models.score_head``): a sequence-classification
        # checkpoint's, or a reranker's made from two LM head rows. None: no head.
        self.score: ScoreHead | None = None
        self.generates = True  # False: a sequence classifier, whose LM head is a stand-in

    def serve_text_only(self) -> None:
        """Load the language model of a vision-language checkpoint: its weights under
        ``LANGUAGE_MODEL_PREFIXES``, the vision tower and projector skipped (heron takes text)."""
        self.weight_mapping = replace(self.weight_mapping, prefixes=LANGUAGE_MODEL_PREFIXES,
                                      ignored=self.weight_mapping.ignored + (VISION_WEIGHTS,))

    @property
    def backbone(self) -> nn.Module:
        return self.get_submodule(self._prefix)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        if ctx.lora is None:
            return self.backbone(input_ids, positions, ctx)  # [T, hidden]
        if self.lora_slot is None:
            raise ValueError("this model has no LoRA layers: load it with LoRA enabled")
        with self.lora_slot.active(ctx.lora):  # its projections add the adapters' products
            return self.backbone(input_ids, positions, ctx)

    def enable_lora(self) -> LoRASlot:
        """Give every projection a LoRA layer (``heron.layers.lora``); the batch of a forward
        whose ``ctx.lora`` is set reaches them through the returned slot."""
        if self.lora_slot is None:
            self.lora_slot = attach_lora(self)
        return self.lora_slot

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [N, vocab] float32

    @property
    def num_labels(self) -> int:
        """The classification head's labels; 0 without one."""
        return 0 if self.score is None else self.score.num_labels

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """A pooled final hidden state [hidden] -> classifier logits [num_labels] float32."""
        if self.score is None:
            raise ValueError("this model has no classification head")
        return self.score(pooled)  # [num_labels]

    def prepare_decode(self, kv_caches: list[torch.Tensor]) -> bool:
        """Set up the one-call decode step (``FusedDecode``) over ``kv_caches`` where the
        backbone describes its layers (``decoder_stack``) and the CPU kernels take them; the
        weights must not change afterwards. Returns whether decode steps use it."""
        backbone = self.backbone
        describe = getattr(backbone, "decoder_stack", None)
        if describe is None:
            return False
        fused = FusedDecode.build(describe(), kv_caches)
        setattr(backbone, "fused_decode", fused)  # noqa: B010 - read by the backbone's forward
        return fused is not None
