"""End to end: POST /v1/score and the rerank routes (/v1/rerank, /rerank, /v2/rerank) against
`heron serve` on tiny random checkpoints: a Qwen3ForSequenceClassification cross-encoder (scores
equal transformers'), a Qwen3ForCausalLM served as a reranker (--hf-overrides), a plain Llama
(the cosine of /v1/embeddings' vectors). Exact 400 bodies, exact usage, --api-key, the heavy
lane for a large body. The scores themselves are tested offline in test_scoring.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import transformers

from tests.server_utils import RemoteServer
from tests.test_scoring import DOCS, QUERY, RERANKER, _hf_classifier_score, _hf_pair_ids
from tests.tiny_models import save_tiny_classifier, save_tiny_qwen3, save_tiny_server_model

KEY = "sk-score"
ROUTES = ["/v1/rerank", "/rerank", "/v2/rerank"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("qwen3-cls"), "qwen3", 1)


@pytest.fixture(scope="module")
def server(classifier_dir: Path) -> Iterator[RemoteServer]:
    with RemoteServer([str(classifier_dir), "--dtype", "float32", "--kv-cache-memory", "16MiB",
                       "--served-model-name", "ranker"], api_key=KEY) as srv:
        yield srv


def post(server: RemoteServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url(path), json=body, headers=server.headers(), timeout=120)


def error_of(message: str, param: str | None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": code}}


def test_score_equals_transformers_with_exact_usage(server: RemoteServer,
                                                    classifier_dir: Path) -> None:
    r = post(server, "/v1/score", {"model": "ranker", "text_1": QUERY, "text_2": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "ranker"
    assert body["id"].startswith("score-")
    assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(4)]
    want = [_hf_classifier_score(classifier_dir, QUERY, d) for d in DOCS]
    np.testing.assert_allclose([d["score"] for d in body["data"]], want, atol=1e-5, rtol=0)
    tokens = sum(len(_hf_pair_ids(classifier_dir, QUERY, d)) for d in DOCS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    zipped = post(server, "/score", {"text_1": [QUERY, DOCS[1]], "text_2": [DOCS[0], QUERY]})
    assert zipped.status_code == 200, zipped.text
    np.testing.assert_allclose(
        [d["score"] for d in zipped.json()["data"]],
        [want[0], _hf_classifier_score(classifier_dir, DOCS[1], QUERY)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("route", ROUTES)
def test_rerank_sorts_and_cuts(server: RemoteServer, classifier_dir: Path, route: str) -> None:
    # Cohere's body: documents as objects, top_n
    r = post(server, route, {"model": "ranker", "query": QUERY, "top_n": 3,
                             "documents": [{"text": d} for d in DOCS]})
    assert r.status_code == 200, r.text
    body = r.json()
    want = [_hf_classifier_score(classifier_dir, QUERY, d) for d in DOCS]
    order = sorted(range(4), key=lambda i: -want[i])[:3]
    assert [x["index"] for x in body["results"]] == order
    np.testing.assert_allclose([x["relevance_score"] for x in body["results"]],
                               [want[i] for i in order], atol=1e-5, rtol=0)
    assert [x["document"] for x in body["results"]] == [{"text": DOCS[i]} for i in order]
    tokens = sum(len(_hf_pair_ids(classifier_dir, QUERY, d)) for d in DOCS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert body["model"] == "ranker" and body["id"].startswith("rerank-")
    # Jina's body: strings, no documents back
    bare = post(server, route, {"query": QUERY, "documents": DOCS, "return_documents": False})
    assert [set(x) for x in bare.json()["results"]] == [{"index", "relevance_score"}] * 4


@pytest.mark.parametrize(("path", "body", "error"), [
    ("/v1/rerank", {"query": QUERY, "documents": []},
     error_of("documents must not be empty", "documents")),
    ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0},
     error_of("top_n must be at least 1, got 0", "top_n")),
    ("/v1/rerank", {"query": QUERY, "documents": ["a"] * 2049},
     error_of("Invalid 'documents': array too long. Expected an array with maximum length "
              "2048, but got an array with length 2049 instead.", "documents",
              "array_above_max_length")),
    ("/v1/rerank", {"query": QUERY, "documents": ["a", ""]},
     error_of("documents[1] is empty: at least one character is needed", "documents[1]")),
    ("/v1/rerank", {"query": "", "documents": ["a"]},
     error_of("query is empty: at least one character is needed", "query")),
    ("/v1/rerank", {"query": QUERY, "documents": ["a"], "top_k": 2},
     error_of("Unknown parameter: 'top_k'.", "top_k", "unknown_parameter")),
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]},
     error_of("text_1 holds 2 texts and text_2 3: give one text on a side, or as many on both",
              "text_1")),
    ("/v1/score", {"text_1": "a", "text_2": []}, error_of("text_2 must not be empty", "text_2")),
    ("/v1/score", {"text_1": "a", "text_2": ["b"] * 2049},
     error_of("Invalid 'text_2': array too long. Expected an array with maximum length "
              "2048, but got an array with length 2049 instead.", "text_2",
              "array_above_max_length")),
    ("/v1/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 8},
     None),
])
def test_bad_input_is_a_400(server: RemoteServer, path: str, body: dict[str, Any],
                            error: dict[str, Any] | None) -> None:
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    if error is not None:
        assert r.json() == error
    else:
        assert r.json()["error"]["param"] == "truncate_prompt_tokens"


def test_too_long_pair_is_refused_by_name(server: RemoteServer, classifier_dir: Path) -> None:
    long_doc = "y" * 1100
    tokens = len(_hf_pair_ids(classifier_dir, QUERY, long_doc))
    r = post(server, "/v1/rerank", {"query": QUERY, "documents": ["a", long_doc]})
    assert r.status_code == 400
    assert r.json() == error_of(
        f"This model's maximum context length is 1024 tokens. However, the pair of "
        f"documents[1] has {tokens} tokens. Please reduce the length of the input.",
        "documents", "context_length_exceeded")


def test_large_body_takes_the_heavy_lane(server: RemoteServer, classifier_dir: Path) -> None:
    docs = [f"{i} " + "heron " * 30 for i in range(120)]  # ~22 KB: parsed on the lane
    assert len(json.dumps({"query": QUERY, "documents": docs})) > 16 << 10
    r = post(server, "/v1/rerank", {"query": QUERY, "documents": docs, "top_n": 2})
    assert r.status_code == 200, r.text
    small = post(server, "/v1/rerank", {"query": QUERY, "documents": docs[:40], "top_n": 2})
    best = max(range(40), key=lambda i: _hf_classifier_score(classifier_dir, QUERY, docs[i]))
    assert small.json()["results"][0]["index"] == best
    scores = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert len(scores) == 2 and max(scores.values()) >= small.json()["results"][0][
        "relevance_score"] - 1e-6


def test_routes_need_the_key(server: RemoteServer) -> None:
    for path in ["/v1/score", *ROUTES]:
        r = httpx.post(server.url(path), json={"query": "a", "documents": ["b"]}, timeout=30)
        assert r.status_code == 401, (path, r.text)


def test_classifier_does_not_generate(server: RemoteServer) -> None:
    r = post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 2})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "this model is a sequence classifier: it scores (/v1/score, /v1/rerank) and embeds, "
        "it does not generate text")


def test_causal_lm_reranker_through_hf_overrides(tmp_path: Path) -> None:
    path = save_tiny_qwen3(tmp_path)
    with RemoteServer([str(path), "--dtype", "float32", "--kv-cache-memory", "16MiB",
                       "--hf-overrides", json.dumps(RERANKER)]) as srv:
        r = post(srv, "/v1/rerank", {"query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    no, yes = tokenizer.convert_tokens_to_ids(["n", "y"])
    want = []
    for doc in DOCS:
        with torch.inference_mode():
            logits = model(torch.tensor([tokenizer(QUERY, doc)["input_ids"]])).logits[0, -1]
        want.append(float(torch.sigmoid(logits[yes] - logits[no])))
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    np.testing.assert_allclose([got[i] for i in range(4)], want, atol=1e-5, rtol=0)


def test_embedding_model_scores_by_cosine(tmp_path: Path) -> None:
    path = save_tiny_server_model(tmp_path)
    texts = [QUERY, *DOCS[:2]]
    with RemoteServer([str(path), "--dtype", "float32", "--kv-cache-memory", "16MiB"]) as srv:
        score = post(srv, "/v1/score", {"text_1": QUERY, "text_2": DOCS[:2]}).json()
        vectors = [np.array(d["embedding"]) for d in
                   post(srv, "/v1/embeddings", {"input": texts}).json()["data"]]
        rerank = post(srv, "/v1/rerank", {"query": QUERY, "documents": DOCS[:2]}).json()
    want = [float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])]
    np.testing.assert_allclose([d["score"] for d in score["data"]], want, atol=1e-6, rtol=0)
    tokens = sum(len(transformers.AutoTokenizer.from_pretrained(path)(t)["input_ids"])
                 for t in texts)  # each distinct text embedded once
    assert score["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert [x["index"] for x in rerank["results"]] == sorted(range(2), key=lambda i: -want[i])
