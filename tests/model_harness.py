"""Test helpers: tiny random HF models, heron twins loaded from their safetensors, and a
paged-KV session that builds ``AttentionMetadata`` by hand the way the engine runner does.

    hf = make_hf_model(config)                      # transformers model, float32, random weights
    model = load_heron_model(hf, tmp_path)          # save_pretrained -> config.json + safetensors
    session = PagedSession(model)
    logits = session.step({0: prompt_a, 1: prompt_b[:5]})   # {req: [chunk_len, vocab]}
    expected = hf_logits(hf, session.tokens[0])             # [seq_len, vocab]
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from heron.layers.attention import AttentionMetadata, ForwardContext, PrefillSpan
from heron.layers.lora import AdapterWeights, LoRABatch, LoRAGroup
from heron.loader.weights import load_weights
from heron.models.registry import get_model_class


def randomize_(model: nn.Module, seed: int) -> None:
    """Re-draw every parameter so activations and logits are O(1), not near zero.

    Linear weights ~ N(0, (1.5 / sqrt(fan_in))^2); embeddings ~ N(0, 1); 1-D weights (norms,
    biases) get N(0, 0.2^2) noise on top of their init (ones for Llama norms, zeros for Gemma).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() == 1:
                param.add_(0.2 * noise)
            elif "embed" in name or "wte" in name:
                param.copy_(noise)
            else:
                param.copy_(noise * 1.5 / math.sqrt(param.shape[1]))


def make_hf_model(config: transformers.PretrainedConfig, seed: int = 0) -> nn.Module:
    """A transformers causal LM (or vision-language model, for a config with a text config) in
    float32 with seeded random weights, eager attention."""
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = auto_model_class(config).from_config(config, attn_implementation="eager",
                                                 dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def load_heron_model(hf_model: nn.Module, directory: Path) -> nn.Module:
    """save_pretrained, then build heron's model from config.json and load the safetensors."""
    hf_model.save_pretrained(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    model = get_model_class(config.architectures)(config)
    weights = {}
    for path in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(path))
    load_weights(model, weights.items())
    return model.eval()


def auto_model_class(config: transformers.PretrainedConfig) -> type:
    """transformers' auto class for ``config``: image-text-to-text where the config holds a
    separate text config (Mistral3 has no causal-LM class), else causal LM."""
    if config.get_text_config() is not config:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


@torch.no_grad()
def hf_logits(hf_model: nn.Module, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab] float32: the reference logits at every position, no cache."""
    out = hf_model(input_ids=torch.tensor([tokens]), use_cache=False)
    return out.logits[0].float()


def prompt_and_greedy_logits(model: nn.Module, vocab: int, steps: int = 3,
                             length: int = 40, lora: AdapterWeights | None = None,
                             ) -> tuple[torch.Tensor, list[int]]:
    """heron's logits at every position of a seeded random ``length``-token prompt and of
    ``steps`` greedy decode steps over a paged KV cache, and the tokens they cover (for
    ``hf_logits``); ``lora``: with that adapter."""
    session = PagedSession(model.eval())
    loras = None if lora is None else {0: lora}
    prompt = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(4)).tolist()
    logits = session.step({0: prompt}, loras)[0]
    for _ in range(steps):
        logits = torch.cat([logits, session.step({0: [int(logits[-1].argmax())]}, loras)[0]])
    return logits, session.tokens[0]


@torch.no_grad()
def argmax_continuation(hf_model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' argmax at each of n steps over the whole text (no cache), EOS included:
    what heron's greedy ``ignore_eos`` gives. ``generate(min_new_tokens=n)`` is not this
    reference: it forbids EOS, so a model whose greedy choice is EOS would split from it."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        logits = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


class PagedSession:
    """Runs a heron model step by step over a paged KV cache, one flat batch per step.

    Blocks are handed out in a shuffled order so block tables are not contiguous. A request
    may start on another request's full prefix blocks (a prefix-cache hit).
    """

    def __init__(self, model: nn.Module, num_blocks: int = 64, block_size: int = 4,
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.block_size = block_size
        shape = (2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(model.num_layers)]
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.free_blocks = order.tolist()
        self.block_tables: dict[int, list[int]] = {}
        self.tokens: dict[int, list[int]] = {}  # every token fed so far, per request

    def share_prefix(self, req: int, source: int, num_blocks: int) -> None:
        """Start ``req`` on the first ``num_blocks`` (full) blocks of ``source``: a cache hit."""
        num_tokens = num_blocks * self.block_size
        if len(self.tokens[source]) < num_tokens:
            raise ValueError("source has not computed that many tokens")
        self.block_tables[req] = list(self.block_tables[source][:num_blocks])
        self.tokens[req] = list(self.tokens[source][:num_tokens])

    def step(self, chunks: dict[int, list[int]],
             loras: dict[int, AdapterWeights] | None = None) -> dict[int, torch.Tensor]:
        """Feed each request its next tokens in one forward; logits [len(chunk), vocab] each.
        ``loras``: the LoRA adapter of some requests (their rows form one group each)."""
        input_ids, positions, slots = [], [], []
        groups = []
        decodes, prefills = [], []
        for req, chunk in chunks.items():
            start = len(self.tokens.setdefault(req, []))
            table = self._grow(req, start + len(chunk))
            flat_start = len(input_ids)
            for pos in range(start, start + len(chunk)):
                positions.append(pos)
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            input_ids += chunk
            self.tokens[req] += chunk
            if loras and req in loras:
                rows = torch.arange(flat_start, len(input_ids))
                groups.append(LoRAGroup(rows, loras[req]))
            if len(chunk) == 1:
                decodes.append((flat_start, start + 1, table))
            else:
                prefills.append(PrefillSpan(flat_start, len(input_ids), start + len(chunk),
                                            torch.tensor(table, dtype=torch.int64)))
        meta = self._metadata(slots, decodes, prefills)
        ctx = ForwardContext(attn_metadata=meta, kv_caches=self.kv_caches,
                             lora=LoRABatch(tuple(groups)) if groups else None)
        with torch.no_grad():
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions), ctx)
            logits = self.model.compute_logits(hidden)  # [T, vocab]
        out, offset = {}, 0
        for req, chunk in chunks.items():
            out[req] = logits[offset:offset + len(chunk)]
            offset += len(chunk)
        return out

    def _grow(self, req: int, seq_len: int) -> list[int]:
        table = self.block_tables.setdefault(req, [])
        while len(table) * self.block_size < seq_len:
            table.append(self.free_blocks.pop())
        return table

    def _metadata(self, slots: list[int], decodes: list[tuple[int, int, list[int]]],
                  prefills: list[PrefillSpan]) -> AttentionMetadata:
        max_blocks = max((len(t) for _, _, t in decodes), default=0)
        tables = [t + [0] * (max_blocks - len(t)) for _, _, t in decodes]
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            decode_token_idx=torch.tensor([i for i, _, _ in decodes], dtype=torch.int64),
            decode_seq_lens=torch.tensor([n for _, n, _ in decodes], dtype=torch.int64),
            decode_block_tables=torch.tensor(tables, dtype=torch.int64).view(len(decodes), max_blocks),
            prefills=prefills,
            block_size=self.block_size,
        )
