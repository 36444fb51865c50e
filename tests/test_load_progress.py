"""Start-up progress: ``/health`` answers 503 ``{"status": "loading"}`` until the model is ready
(a real ``heron serve``), the load steps report 100 % in the log when stderr is not a terminal,
and ``heron.progress`` itself (log mode). The terminal side (tqdm bars) is checked through a
pty in test_chat_cli.py."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from heron import progress
from tests.server_utils import RemoteServer
from tests.tiny_models import save_tiny_chat_model


def _poll(srv: RemoteServer, timeout_s: float = 600.0) -> list[tuple[int | None, object]]:
    """``/health`` answers (None: no connection) from the start until the first 200, then
    /v1/models once while still loading (if it was seen loading)."""
    seen: list[tuple[int | None, object]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert srv.proc.poll() is None, srv.log_tail()
        try:
            r = httpx.get(srv.url("/health"), timeout=5)
        except httpx.HTTPError:
            seen.append((None, None))
        else:
            seen.append((r.status_code, r.json() if r.content else None))
            if r.status_code == 200:
                return seen
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout_s} s:\n{srv.log_tail()}")


def test_health_says_loading_until_ready_and_steps_reach_100(tmp_path: Path) -> None:
    model_dir = save_tiny_chat_model(tmp_path / "tiny")
    with RemoteServer([str(model_dir), "--kv-cache-memory", "16MiB"], wait_ready=False) as srv:
        seen = _poll(srv)
        answers = [s for s in seen if s[0] is not None]
        assert answers[-1] == (200, None)
        # Before the 200 the server answered, and said "loading" every time.
        assert answers[:-1] and all(a == (503, {"status": "loading"}) for a in answers[:-1])
        for _ in range(3):
            assert httpx.get(srv.url("/health")).status_code == 200
        assert httpx.get(srv.url("/v1/models")).status_code == 200
        log = srv.log_text()
    # stderr is a file here: plain log lines, one per step, at 100 % before "serving".
    reading = log.index("heron.progress: reading tensors: 100% (21/21 tensors) in ")
    assert reading < log.index("heron.server: serving ")
    assert log.index("Uvicorn running on") < log.index("engine ready in")


def test_api_answers_503_while_loading() -> None:
    """The app before ``mark_ready``: every API route a 503 in OpenAI's error shape."""
    from fastapi.testclient import TestClient

    from heron.server.app import build_app
    from heron.server.config import ServerConfig

    client = TestClient(build_app(ServerConfig()), base_url="http://127.0.0.1:8000")
    health = client.get("/health")
    assert (health.status_code, health.json()) == (503, {"status": "loading"})
    models = client.get("/v1/models")
    assert models.status_code == 503
    assert models.json()["error"]["code"] == "model_loading"
    chat = client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert chat.status_code == 503


@pytest.fixture
def log_mode(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(progress.MODE_ENV_VAR, "log")
    caplog.set_level(logging.INFO, logger="heron.progress")


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "heron.progress"]


def test_a_finished_step_is_at_100_even_with_an_estimated_total(
        log_mode: None, caplog: pytest.LogCaptureFixture) -> None:
    assert list(progress.track(iter(range(7)), "reading tensors", total=10, unit="tensor")) == \
        list(range(7))
    (line,) = _messages(caplog)
    assert line.startswith("reading tensors: 100% (7/7 tensors) in ")


def test_a_failed_step_says_where_it_stopped(
        log_mode: None, caplog: pytest.LogCaptureFixture) -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("disk gone")

    with pytest.raises(OSError):
        list(progress.track(items(), "reading tensors", total=5, unit="tensor"))
    (line,) = _messages(caplog)
    assert line.startswith("reading tensors: 40% (2/5 tensors) in ") and line.endswith("(stopped)")


def test_long_steps_log_while_they_run(log_mode: None, caplog: pytest.LogCaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with progress.Progress("preparing weights (int8)", total=4, unit="projection") as p:
        for _ in range(4):
            p.update()
    assert _messages(caplog)[:2] == ["preparing weights (int8): 25% (1/4 projections)",
                                     "preparing weights (int8): 50% (2/4 projections)"]
    assert _messages(caplog)[-1].startswith("preparing weights (int8): 100% (4/4 projections) in ")


def test_one_unit_steps_say_when_they_start(log_mode: None,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with progress.Progress("compiling CPU kernel q8_gemm", total=1, unit="kernel") as p:
        p.update()
    first, last = _messages(caplog)
    assert first == "compiling CPU kernel q8_gemm ..."
    assert last.startswith("compiling CPU kernel q8_gemm: 100% (1/1 kernels) in ")


def test_mode_off_is_silent_and_bar_is_the_terminal_default(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(progress.MODE_ENV_VAR, "off")
    caplog.set_level(logging.INFO, logger="heron.progress")
    assert list(progress.track([1, 2], "reading tensors")) == [1, 2]
    assert _messages(caplog) == []
    monkeypatch.delenv(progress.MODE_ENV_VAR)

    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress.sys, "stderr", Terminal())
    assert progress.progress_mode() == "bar"
    monkeypatch.setattr(progress.sys, "stderr", None)
    assert progress.progress_mode() == "log"
