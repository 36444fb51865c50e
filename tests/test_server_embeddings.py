"""End to end: /v1/embeddings from the served model through the openai SDK and LangChain's
OpenAIEmbeddings, against `heron serve` with the default model (mean pooling).

The engine's pooling itself (against transformers, batch invariance, chunks, preemption) is
tested on a tiny model in test_pooling.py; this checks the route, its encodings and clients.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.server_utils import DEFAULT_MODEL_NAME, RemoteServer

pytestmark = pytest.mark.slow

MODEL = DEFAULT_MODEL_NAME
HIDDEN = 640  # Gemma 3 270M
TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "hi",
         "Embeddings map text to vectors; similar meanings land close together."]


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    with RemoteServer(["--served-model-name", MODEL, "--kv-cache-memory", "256MiB"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def exact(server: RemoteServer) -> bool:
    """float32 engines give the same bits alone or in a batch; bfloat16 ones within 1e-3."""
    match = re.search(r"on \w+ \((\w+)\), max_model_len", server.log_text())
    assert match is not None, server.log_tail()
    return match.group(1) == "float32"


def vectors(client: openai.OpenAI, texts: list[str] | str, **kw: object) -> np.ndarray:
    data = client.embeddings.create(model=MODEL, input=texts, **kw).data
    assert [d.index for d in data] == list(range(len(data)))
    return np.array([d.embedding for d in data], dtype=np.float32)


def assert_same(a: np.ndarray, b: np.ndarray, exact: bool) -> None:
    if exact:
        assert a.tobytes() == b.tobytes()
    else:
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)


def test_base64_by_default_and_float_agree(server: RemoteServer, client: openai.OpenAI) -> None:
    raw = httpx.post(server.url("/v1/embeddings"), json={
        "model": MODEL, "input": TEXTS[0], "encoding_format": "base64"}).json()
    encoded = raw["data"][0]["embedding"]
    assert isinstance(encoded, str) and len(base64.b64decode(encoded)) == 4 * HIDDEN
    sdk = vectors(client, TEXTS[0])  # the SDK asks for base64 and decodes it
    floats = vectors(client, TEXTS[0], encoding_format="float")
    assert sdk.shape == (1, HIDDEN)
    assert sdk.tobytes() == floats.tobytes() == np.frombuffer(base64.b64decode(encoded),
                                                              dtype="<f4").tobytes()
    assert float(np.linalg.norm(sdk[0])) == pytest.approx(1.0, abs=1e-5)
    assert float(sdk[0] @ sdk[0]) == pytest.approx(1.0, abs=1e-5)  # cosine with itself


def test_usage_and_response_shape(server: RemoteServer, client: openai.OpenAI) -> None:
    r = client.embeddings.create(model=MODEL, input=TEXTS)
    counts = [httpx.post(server.url("/tokenize"), json={"prompt": t}).json()["count"]
              for t in TEXTS]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(counts)
    assert r.model == MODEL and r.object == "list" and len(r.data) == len(TEXTS)
    assert all(d.object == "embedding" for d in r.data)


def test_batch_equals_single_and_determinism(client: openai.OpenAI, exact: bool) -> None:
    batch = vectors(client, TEXTS)
    for i, text in enumerate(TEXTS):
        assert_same(vectors(client, text)[0], batch[i], exact)
    assert vectors(client, TEXTS).tobytes() == batch.tobytes()  # the same request again
    similar = batch[1] @ vectors(client, "France's capital city is Paris.")[0]
    assert similar > batch[1] @ batch[0]  # closer in meaning, closer in space


def test_token_id_inputs(server: RemoteServer, client: openai.OpenAI) -> None:
    ids = [httpx.post(server.url("/tokenize"), json={"prompt": t}).json()["tokens"]
           for t in TEXTS[:2]]
    by_text = vectors(client, TEXTS[:2])
    assert vectors(client, ids).tobytes() == by_text.tobytes()
    assert vectors(client, ids[0]).tobytes() == by_text[0].tobytes()


def test_dimensions_cut_and_renormalise(client: openai.OpenAI) -> None:
    full = vectors(client, TEXTS[1])[0]
    cut = vectors(client, TEXTS[1], dimensions=64)[0]
    assert cut.shape == (64,)
    np.testing.assert_allclose(cut, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    assert float(np.linalg.norm(cut)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("fields,param,message", [
    ({"dimensions": 0}, "dimensions", f"dimensions must be in [1, {HIDDEN}]"),
    ({"dimensions": HIDDEN + 1}, "dimensions", f"got {HIDDEN + 1}"),
    ({"input": []}, "input", "input must not be empty"),
    ({"input": ""}, "input", "input is empty"),
    ({"input": ["a", ""]}, "input[1]", "input[1] is empty"),
    ({"input": [[1, 2], [300000]]}, "input", "token id 300000 is outside the vocabulary"),
    ({"input": ["a"] * 2049}, "input", "at most 2048 per request"),
    ({"encoding_format": "int8"}, "encoding_format", "encoding_format"),
    ({"input": "word " * 20000}, "input", "maximum context length"),
])
def test_bad_requests_name_the_field(server: RemoteServer, fields: dict, param: str | None,
                                     message: str) -> None:
    r = httpx.post(server.url("/v1/embeddings"), json={"model": MODEL, "input": "x", **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == param


def test_unknown_model(server: RemoteServer) -> None:
    r = httpx.post(server.url("/v1/embeddings"), json={"model": "text-embedding-3-small",
                                                       "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_langchain_openai_embeddings(server: RemoteServer, client: openai.OpenAI,
                                     exact: bool) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=MODEL, api_key="EMPTY", base_url=server.api_base,
                                  check_embedding_ctx_length=False, dimensions=128)
    docs = np.array(embeddings.embed_documents(TEXTS), dtype=np.float32)
    query = np.array(embeddings.embed_query(TEXTS[2]), dtype=np.float32)
    assert docs.shape == (len(TEXTS), 128)
    assert docs.tobytes() == vectors(client, TEXTS, dimensions=128).tobytes()
    assert_same(query, docs[2], exact)
    assert np.allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)


def test_metrics_count_embedding_requests(server: RemoteServer, client: openai.OpenAI) -> None:
    def counts() -> tuple[float, float]:
        text = httpx.get(server.url("/metrics")).text
        route = re.search(r'^heron:http_requests_total\{[^}]*route="/v1/embeddings"'
                          r'[^}]*status="200"[^}]*\} (\S+)$', text, re.MULTILINE)
        prompts = re.search(r"^heron:request_prompt_tokens_count\{[^}]*\} (\S+)$", text,
                            re.MULTILINE)
        return (float(route.group(1)) if route else 0.0, float(prompts.group(1)) if prompts
                else 0.0)

    before = counts()
    client.embeddings.create(model=MODEL, input=TEXTS)
    after = counts()
    assert after == (before[0] + 1, before[1] + len(TEXTS))
