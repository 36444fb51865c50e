"""RotaryEmbedding.cos_sin looks cos / sin up in tables it grows on demand: the values must be
exactly those computed for the positions alone, for every RoPE variant and dtype."""

from __future__ import annotations

import pytest
import torch

from heron.layers.rotary import TABLE_STEP, RotaryEmbedding

VARIANTS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 8.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
             "original_max_position_embeddings": 32768},
}


def _computed(rope: RotaryEmbedding, positions: torch.Tensor,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """What cos_sin computed per call before the tables: the same elementwise operations."""
    angles = positions[:, None].float() * rope._inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    if rope.scaling != 1.0:
        cos, sin = cos * rope.scaling, sin * rope.scaling
    return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_table_lookups_are_the_computed_values(variant: str, dtype: torch.dtype) -> None:
    rope = RotaryEmbedding(128, VARIANTS[variant], max_positions=131072)
    steps = [torch.tensor([0]), torch.tensor([5, 3, 17]),  # a first table of TABLE_STEP
             torch.tensor([TABLE_STEP - 1, TABLE_STEP]),  # grows across the boundary
             torch.arange(0, 70000, 13), torch.randint(0, 131072, (300,), generator=torch.Generator().manual_seed(0))]
    for positions in steps:
        cos, sin = rope.cos_sin(positions, dtype)
        expected_cos, expected_sin = _computed(rope, positions, dtype)
        assert cos.dtype == dtype and cos.shape == (positions.numel(), 1, 64) and cos.is_contiguous()
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
        table = rope._tables[(dtype, positions.device)][0]
        assert table.shape[0] % TABLE_STEP == 0 and table.shape[0] > int(positions.max())


def test_tables_grow_only_as_far_as_the_positions_seen() -> None:
    rope = RotaryEmbedding(256, VARIANTS["default"])
    rope.cos_sin(torch.tensor([3, 100]), torch.bfloat16)
    assert rope._tables[(torch.bfloat16, torch.device("cpu"))][0].shape == (TABLE_STEP, 128)
    rope.cos_sin(torch.tensor([2 * TABLE_STEP + 1]), torch.bfloat16)
    assert rope._tables[(torch.bfloat16, torch.device("cpu"))][0].shape == (3 * TABLE_STEP, 128)
