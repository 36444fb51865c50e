"""vLLM's score API (``POST /v1/score``) and the Jina / Cohere rerank API (``POST /v1/rerank``,
``/rerank``, ``/v2/rerank``): the requests and what they answer with."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, SerializeAsAny

from heron.scoring import pair_texts
from heron.server.protocol import RequestBody
from heron.server.protocol_embeddings import MAX_EMBEDDING_INPUTS, EmbeddingUsage

MAX_SCORE_TEXTS = MAX_EMBEDDING_INPUTS  # texts on a side of /v1/score, documents of a rerank
# vLLM's and Cohere's extras heron does not do: refused unless left at their default.
_NOT_DONE: dict[str, tuple[object, ...]] = {
    "truncate_prompt_tokens": (None,), "max_tokens_per_doc": (None,),
    "rank_fields": (None,), "max_chunks_per_doc": (None,)}


class ScoreRequest(RequestBody):
    """POST /v1/score: ``text_1`` against ``text_2``, each a string or a list of them (one
    text on a side is scored against every text on the other; two lists are zipped)."""

    MAX_ITEMS: ClassVar[dict[str, int]] = {"text_1": MAX_SCORE_TEXTS, "text_2": MAX_SCORE_TEXTS}
    UNSUPPORTED: ClassVar[dict[str, tuple[object, ...]]] = _NOT_DONE
    IGNORED: ClassVar[frozenset[str]] = frozenset(("user", "priority"))

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]

    def to_pairs(self) -> list[tuple[str, str]]:
        """The (text_1, text_2) pairs; ValueError naming the field that is empty or unpaired."""
        for name, value in (("text_1", self.text_1), ("text_2", self.text_2)):
            _check_texts(name, [value] if isinstance(value, str) else value,
                         isinstance(value, list))
        return pair_texts(self.text_1, self.text_2)


class DocumentText(BaseModel):
    """A document as an object (Cohere's and Jina's ``{"text": ...}``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str


class RerankRequest(RequestBody):
    """POST /v1/rerank: ``documents`` (strings or ``{"text": ...}``) ranked by their relevance
    to ``query``, the ``top_n`` best (all by default)."""

    MAX_ITEMS: ClassVar[dict[str, int]] = {"documents": MAX_SCORE_TEXTS}
    UNSUPPORTED: ClassVar[dict[str, tuple[object, ...]]] = _NOT_DONE
    IGNORED: ClassVar[frozenset[str]] = frozenset(("user", "priority"))

    model: str | None = None
    query: str
    documents: list[str | DocumentText]
    top_n: int | None = None
    return_documents: bool = True

    def texts(self) -> list[str]:
        """The documents' texts; ValueError naming the field for an empty one, no documents
        or a ``top_n`` below 1."""
        _check_texts("query", [self.query], False)
        texts = [d if isinstance(d, str) else d.text for d in self.documents]
        _check_texts("documents", texts, True)
        if self.top_n is not None and self.top_n < 1:
            raise ValueError(f"top_n must be at least 1, got {self.top_n}")
        return texts


def _check_texts(name: str, texts: list[str], is_list: bool) -> None:
    if not texts:
        raise ValueError(f"{name} must not be empty")
    for i, text in enumerate(texts):
        if not text:
            where = f"{name}[{i}]" if is_list else name
            raise ValueError(f"{where} is empty: at least one character is needed")


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: EmbeddingUsage


class RerankResult(BaseModel):
    index: int
    relevance_score: float


class RerankResultWithDocument(RerankResult):
    document: DocumentText


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: EmbeddingUsage
    results: list[SerializeAsAny[RerankResult]]
