"""End to end: the README's LangChain story, exactly as a user writes it, against `heron serve`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from heron.config import ModelConfig
from heron.tokenizer import Tokenizer, load_tokenizer
from tests.server_utils import DEFAULT_MODEL_NAME, RemoteServer

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful assistant that translates English to Italian."
USER = "Translate the following sentence from English to Italian: I love programming."
MESSAGES = [SystemMessage(content=SYSTEM), HumanMessage(content=USER)]


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    with RemoteServer(
        ["--served-model-name", DEFAULT_MODEL_NAME, "--kv-cache-memory", "256MiB"]
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def chat(server: RemoteServer) -> ChatOpenAI:
    # The user's story, verbatim but for the port.
    return ChatOpenAI(
        model="mosaicml/mpt-7b",
        openai_api_key="EMPTY",
        openai_api_base=server.api_base,
        max_tokens=5,
        temperature=0,
    )


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def answer(chat: ChatOpenAI) -> AIMessage:
    return chat.invoke(MESSAGES)


def test_invoke_usage_and_finish_reason(answer: AIMessage, tokenizer: Tokenizer) -> None:
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    )
    n_prompt = len(tokenizer.encode(rendered, add_special_tokens=False))
    assert isinstance(answer.content, str) and answer.content
    assert answer.response_metadata["finish_reason"] == "length"
    assert answer.response_metadata["model_name"] == "mosaicml/mpt-7b"
    usage = answer.usage_metadata
    assert usage["input_tokens"] == n_prompt
    assert usage["output_tokens"] == 5
    assert usage["total_tokens"] == n_prompt + 5


def test_stream_equals_invoke(chat: ChatOpenAI, answer: AIMessage) -> None:
    chunks = list(chat.stream(MESSAGES))
    assert len(chunks) > 2
    assert "".join(c.content for c in chunks) == answer.content
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.response_metadata.get("finish_reason") == "length"


def test_stream_usage(server: RemoteServer, answer: AIMessage) -> None:
    streaming = ChatOpenAI(
        model="mosaicml/mpt-7b",
        openai_api_key="EMPTY",
        openai_api_base=server.api_base,
        max_tokens=5,
        temperature=0,
        stream_usage=True,
    )
    merged = None
    for c in streaming.stream(MESSAGES):
        merged = c if merged is None else merged + c
    assert merged is not None and merged.content == answer.content
    assert merged.usage_metadata["output_tokens"] == 5
    assert merged.usage_metadata["input_tokens"] == answer.usage_metadata["input_tokens"]


def test_batch_of_identical_prompts(chat: ChatOpenAI, answer: AIMessage) -> None:
    results = chat.batch([MESSAGES] * 4)
    assert [r.content for r in results] == [answer.content] * 4
    assert all(r.usage_metadata["output_tokens"] == 5 for r in results)


def test_ainvoke(chat: ChatOpenAI, answer: AIMessage) -> None:
    async def both() -> list[AIMessage]:
        return list(await asyncio.gather(chat.ainvoke(MESSAGES), chat.ainvoke(MESSAGES)))

    results = asyncio.run(both())
    assert [r.content for r in results] == [answer.content] * 2


def test_prompt_template_chain(chat: ChatOpenAI, answer: AIMessage) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [
            (
                "system",
                "You are a helpful assistant that translates {input_language} to {output_language}.",
            ),
            (
                "human",
                "Translate the following sentence from {input_language} to {output_language}: {text}",
            ),
        ]
    )
    chain = prompt | chat | StrOutputParser()
    out = chain.invoke(
        {"input_language": "English", "output_language": "Italian", "text": "I love programming."}
    )
    assert out == answer.content
    streamed = "".join(
        chain.stream(
            {
                "input_language": "English",
                "output_language": "Italian",
                "text": "I love programming.",
            }
        )
    )
    assert streamed == answer.content


def test_multi_turn_with_assistant_message(chat: ChatOpenAI) -> None:
    history = [
        *MESSAGES,
        AIMessage(content="Amo programmare."),
        HumanMessage(content="And in French?"),
    ]
    reply = chat.invoke(history)
    assert reply.response_metadata["finish_reason"] in ("length", "stop")
    assert reply.usage_metadata["output_tokens"] <= 5
