"""PoolingParams: how a pooling (embedding) request turns hidden states into one vector.

A pooling request runs its prompt through the model like a prefill and nothing more: no
token is sampled and its KV blocks are freed as soon as the prompt is computed. The final
hidden states (after the model's last norm, before the LM head) are pooled::

    mean   the average over every prompt position
    last   the last prompt position (for causal models, the one that has seen all the text)

then L2-normalised when ``normalize`` (the default) holds. A ``classify`` request instead
takes the last position's state through the model's classification head (``CausalLM.classify``)
and answers with its logits, [num_labels] (``heron.scoring`` turns them into a score).
"""

from __future__ import annotations

from dataclasses import dataclass

POOLING_TYPES = ("mean", "last")


@dataclass(frozen=True)
class PoolingParams:
    """One pooling request's options; ValueError naming the field on a bad value."""

    pooling: str = "mean"
    normalize: bool = True
    classify: bool = False

    @staticmethod
    def classifier() -> PoolingParams:
        """The classification head's logits of the last position (a cross-encoder's)."""
        return PoolingParams(pooling="last", normalize=False, classify=True)

    def __post_init__(self) -> None:
        if self.classify and (self.pooling != "last" or self.normalize):
            raise ValueError("classify pools the last position, unnormalised")
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)}, "
                             f"got {self.pooling!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a boolean, got {self.normalize!r}")
