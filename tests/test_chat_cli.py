"""``heron chat`` in a pseudo-terminal (pexpect): the model in process, and ``--url`` against a
real server. The tiny model's greedy answers run to max_tokens (``save_tiny_chat_model``), so
an answer can be stopped halfway and a finished one compared with the API's."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from heron import chat_cli
from tests.server_utils import REPO_ROOT, RemoteServer
from tests.tiny_models import save_tiny_chat_model

pexpect = pytest.importorskip("pexpect", reason="pexpect is in the test extras")

KEY = "sk-chat-test"
PROMPT = ">>> "


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[RemoteServer]:
    with RemoteServer([str(model_dir), "--kv-cache-memory", "16MiB"], api_key=KEY) as srv:
        yield srv


def spawn_chat(*args: str) -> pexpect.spawn:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TERM="dumb")
    env.pop("HERON_PROGRESS", None)
    env.pop("HERON_API_KEY", None)
    child = pexpect.spawn(sys.executable, ["-m", "heron.cli", "chat", *args], env=env,
                          cwd=str(REPO_ROOT), encoding="utf-8", timeout=180,
                          dimensions=(40, 160))
    return child


def answer_of(child: pexpect.spawn) -> tuple[str, str]:
    """The text written before the stats line, and the stats line, of the answer just sent."""
    child.expect(r"\r?\n?\[([^\]\r\n]*tokens[^\]\r\n]*)\]\r\n")
    return child.before, child.match.group(1)


def assert_cut_at(stats: str, max_tokens: int) -> None:
    """A finished answer's stats line: it ran to max_tokens."""
    assert re.fullmatch(rf"{max_tokens} tokens, [0-9.]+ tok/s, first token \d+ ms, cut at max "
                        r"tokens", stats), stats


def stop_midway(child: pexpect.spawn, message: str) -> tuple[str, str]:
    """Send ``message``, press Ctrl-C once its answer shows; the answer's text and stats."""
    child.sendline(message)
    child.expect(re.escape(message) + "\r\n")  # the terminal's echo of the input
    child.expect(r"\S")  # the first piece of the answer is on the screen
    time.sleep(0.3)
    child.sendintr()  # Ctrl-C
    return answer_of(child)


def test_in_process_chat(model_dir: Path) -> None:
    child = spawn_chat(str(model_dir), "--kv-cache-memory", "16MiB", "--temperature", "0",
                       "--max-tokens", "600")
    try:
        # Loading on a terminal: tqdm bars that end at 100 %.
        child.expect(r"reading tensors: 100%\|[^\r\n]*\| 21/21")
        child.expect(PROMPT)
        # Two 600-token answers do not fit the 1024-token context: before the second, the
        # first exchange is forgotten (and the user told), and the answer runs in full.
        child.sendline("Hello")
        assert_cut_at(answer_of(child)[1], 600)
        child.expect(PROMPT)
        child.sendline("Go on")
        child.expect(r"\(the conversation outgrew the context: forgot the oldest 2 messages\)")
        assert_cut_at(answer_of(child)[1], 600)
        child.expect(PROMPT)
        child.sendline("/clear")
        child.expect(PROMPT)
        child.sendline("/set max_tokens 900")
        child.expect(PROMPT)
        text, stats = stop_midway(child, "Hello")
        assert stats.startswith("stopped, ")
        tokens = int(re.search(r"(\d+) tokens", stats).group(1))
        assert 0 < tokens < 900, stats  # stopped long before max_tokens
        assert text.strip()
        child.expect(PROMPT)
        # The program goes on, and the engine with it: a finished answer after the stopped one
        # (the stopped one kept, or forgotten where a fast machine made it too long).
        child.sendline("/set max_tokens 7")
        child.expect(r"\(max_tokens = 7\)")
        child.expect(PROMPT)
        child.sendline("Again")
        assert_cut_at(answer_of(child)[1], 7)
        child.expect(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_with_a_server(server: RemoteServer, model_dir: Path) -> None:
    child = spawn_chat("--url", server.base_url, "--api-key", KEY, "--temperature", "0",
                       "--max-tokens", "12", "--system", "be brief")
    try:
        child.expect(f"heron chat with {re.escape(str(model_dir))}")
        child.expect(PROMPT)
        # A multi-line message between two """ lines.
        for line in ('"""', "first line", "second line", '"""'):
            child.sendline(line)
        text, stats = answer_of(child)
        messages = [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": "first line\nsecond line"}]
        expected = api_answer(server, str(model_dir), messages)
        # The pty writes \n as \r\n; the answer is the end of what came after the input.
        assert text.replace("\r\n", "\n").rstrip("\n").endswith("\n" + expected.rstrip("\n"))
        assert_cut_at(stats, 12)
        child.expect(PROMPT)
        child.sendline("/set max_tokens 700")  # the history takes some of the 1024
        child.expect(PROMPT)
        _, stats = stop_midway(child, "Tell me more")
        assert stats.startswith("stopped, ")
        wait_idle(server)  # the server dropped the request when the stream was closed
        child.expect(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_reports_an_unreachable_server() -> None:
    child = spawn_chat("--url", "http://127.0.0.1:9")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert "heron chat: cannot reach http://127.0.0.1:9/v1" in child.before


def api_answer(server: RemoteServer, model: str, messages: list[dict[str, str]]) -> str:
    body = {"model": model, "messages": messages, "temperature": 0, "top_p": 1.0,
            "max_tokens": 12}
    r = httpx.post(server.url("/v1/chat/completions"), json=body, headers=server.headers(),
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def wait_idle(server: RemoteServer, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(server.url("/metrics"), headers=server.headers()).text
        running = re.search(r"^heron:num_requests_running\{[^}]*\} ([0-9.]+)$", text, re.M)
        assert running is not None
        if float(running.group(1)) == 0:
            return
        assert time.monotonic() < deadline, "the server still runs the stopped request"
        time.sleep(0.1)


def test_stream_lines_split_at_cr_and_lf_only() -> None:
    """NEL and U+2028 may come raw inside an event's JSON (llama.cpp's server sends them so):
    the event stays one line however the text arrives; CR LF, LF and CR end lines."""
    event = "data: " + json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False)
    stream = f"{event}\r\n\r\n{event}\n\ndata: [DONE]\r"
    for size in (1, 4, len(stream)):
        chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
        assert list(chat_cli.sse_lines(chunks)) == [event, "", event, "", "data: [DONE]"]


def test_a_thinking_models_reasoning_is_shown_apart_from_its_answer() -> None:
    """The server's reasoning deltas (reasoning_content, or vLLM's reasoning) print before the
    answer, apart from it; only the answer joins the conversation."""
    from heron.chat_cli import ChatSession, ChatSettings, Piece, _sse_pieces

    def chunk(**delta: str) -> str:
        return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta}]}) + "\n\n"

    body = (chunk(reasoning_content="Plan") + chunk(reasoning=" it.") + chunk(content="Hi")
            + chunk(content=" there") + "data: [DONE]\n\n")
    pieces = list(_sse_pieces(httpx.Response(200, text=body)))
    assert [(p.reasoning, p.text) for p in pieces] == [
        ("Plan", ""), (" it.", ""), ("", "Hi"), ("", " there")]

    class Scripted:
        name = "scripted"
        interrupt_anywhere = False

        def stream(self, messages: object, settings: object) -> Iterator[Piece]:
            return iter(pieces)

    out = io.StringIO()
    session = ChatSession(Scripted(), ChatSettings(), out=out)  # type: ignore[arg-type]
    session.answer("Hello")
    assert out.getvalue().startswith("thinking: Plan it.\n\nHi there\n")
    assert session.history[-1] == {"role": "assistant", "content": "Hi there"}
