"""OpenAI's embeddings API (``POST /v1/embeddings``): the request and the list it answers with."""

from __future__ import annotations

import base64
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel

from heron.server.inputs import TextInput
from heron.server.protocol import RequestBody

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(RequestBody):
    """POST /v1/embeddings: ``input`` as a string, strings, token ids or lists of token ids."""

    # vLLM extras: vectors are always whole inputs, always L2-normalised.
    UNSUPPORTED: ClassVar[dict[str, tuple[object, ...]]] = {
        "truncate_prompt_tokens": (None,), "normalize": (None, True)}
    IGNORED: ClassVar[frozenset[str]] = frozenset(("user",))

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # vLLM extra
    add_special_tokens: bool | None = True

    def to_input(self) -> TextInput:
        """The prompts to embed; ValueError naming the field when there are none or too many."""
        raw = self.input
        prompts = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
        if not prompts:
            raise ValueError("input must not be empty")
        if len(prompts) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input holds {len(prompts)} items; at most "
                             f"{MAX_EMBEDDING_INPUTS} per request")
        for i, item in enumerate(prompts):
            if not item:
                where = "input" if len(prompts) == 1 else f"input[{i}]"
                raise ValueError(f"{where} is empty: at least one token is needed")
        return TextInput(prompts=list(prompts),  # type: ignore[arg-type]
                         add_special_tokens=self.add_special_tokens is not False, what="input")

    def check_dimensions(self, hidden_size: int) -> None:
        if self.dimensions is not None and not 1 <= self.dimensions <= hidden_size:
            raise ValueError(f"dimensions must be in [1, {hidden_size}] for this model, "
                             f"got {self.dimensions}")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


def encode_vector(vector: np.ndarray, dimensions: int | None,
                  encoding_format: str) -> list[float] | str:
    """A unit vector, cut to ``dimensions`` and renormalised, as floats or base64 float32."""
    if dimensions is not None and dimensions < vector.shape[0]:
        vector = vector[:dimensions]
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    vector = vector.astype("<f4")
    if encoding_format == "base64":
        return base64.b64encode(vector.tobytes()).decode("ascii")
    return vector.tolist()
