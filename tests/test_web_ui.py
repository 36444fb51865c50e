"""The chat page at ``/`` in a real headless Chromium (Debian's ``chromium``), driven through
Playwright's Python API against a real ``heron serve`` with an API key.

The model is a tiny random Llama with a character tokenizer (``save_tiny_chat_model``): its
greedy answers run to ``max_tokens``, and structured output can force an exact answer, which is
how a model answer containing HTML reaches the page through the real stream.

Chromium: ``apt-get install chromium`` (``.ci/run`` does). Without it these tests skip, except
under ``CI=true``, where they fail: CI must run them. Playwright never downloads a browser here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_utils import REPO_ROOT, RemoteServer
from tests.tiny_models import CHAT_TEMPLATE, save_tiny_chat_model

KEY = "sk-web-test"
SCREENSHOT = REPO_ROOT / "docs" / "chat-page.png"  # written when HERON_UPDATE_SCREENSHOT=1
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-renderer-backgrounding", "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
]
HTML_ANSWER = "<img src=x onerror=alert(1)>"
MARKDOWN_ANSWER = "**bold** <script>alert(2)</script> [x](javascript:alert(3)) `<b>code</b>`"
TIMEOUT_MS = 60_000


def chromium_path() -> str | None:
    for candidate in (os.environ.get("HERON_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _no_browser(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; under CI=true the browser tests must run (.ci/run installs "
                    "chromium with apt-get)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("playwright is not installed (pip install -e '.[test]')")
    executable = chromium_path()
    if executable is None:
        _no_browser("no Chromium (apt-get install -y chromium chromium-driver)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


# The tiny model's template, with Qwen3's switch: enable_thinking false closes an empty
# reasoning in the prompt (thinking off: a structured output then governs the whole answer).
THINKING_SWITCH = ("{% if add_generation_prompt and enable_thinking is defined and not "
                   "enable_thinking %}<think></think>{% endif %}")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[RemoteServer]:
    # qwen3's parser: an answer that writes <think>...</think> first has its reasoning apart
    template = model_dir / "thinking-switch.jinja"
    template.write_text(CHAT_TEMPLATE + THINKING_SWITCH)
    with RemoteServer([str(model_dir), "--kv-cache-memory", "16MiB", "--reasoning-parser",
                       "qwen3", "--chat-template", str(template)], api_key=KEY) as srv:
        yield srv


@pytest.fixture
def page(browser: Any, server: RemoteServer) -> Iterator[Any]:
    """A fresh browser context that already holds the API key, on the chat page."""
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    context.add_init_script(f"localStorage.setItem('heron.apiKey', {json.dumps(json.dumps(KEY))})")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.dialogs = []  # type: ignore[attr-defined]
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.goto(server.base_url + "/")
    expect(page.locator("#status")).to_have_text("ready")
    yield page
    context.close()


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as pw_expect

    pw_expect.set_options(timeout=TIMEOUT_MS)
    return pw_expect(locator)


def set_settings(page: Any, **values: str) -> None:
    if page.locator("#settings").is_hidden():
        page.click("#settings-toggle")
    for name, value in values.items():
        page.fill(f"#{name}", value)


def send(page: Any, text: str) -> Any:
    """Type a message, press Enter; returns the locator of the answer being written."""
    count = page.locator("article.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    answer = page.locator("article.assistant").nth(count)
    expect(answer).to_be_attached()
    return answer


def stored_conversation(page: Any) -> list[dict[str, Any]]:
    return json.loads(page.evaluate("localStorage.getItem('heron.conversation')"))


def api_answer(server: RemoteServer, model: str, text: str, **params: Any) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **params}
    r = httpx.post(server.url("/v1/chat/completions"), json=body, headers=server.headers(),
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def metric(server: RemoteServer, name: str) -> float:
    text = httpx.get(server.url("/metrics"), headers=server.headers()).text
    match = re.search(rf"^heron:{name}(?:_total)?\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
    assert match is not None, f"heron:{name} not in /metrics"
    return float(match.group(1))


# ==== tests ========================================================================================


def test_page_asks_for_the_api_key(browser: Any, server: RemoteServer, model_dir: Path) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.base_url + "/")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-reason")).to_contain_text("the API key is missing")
    page.fill("#key-input", "sk-wrong")
    page.click("#key-save")
    expect(page.locator("#key-reason")).to_contain_text("the API key is wrong")
    expect(dialog).to_be_visible()
    page.fill("#key-input", KEY)
    page.click("#key-save")
    expect(dialog).to_be_hidden()
    expect(page.locator("#model")).to_have_text(f"{model_dir} · context 1024 tokens")
    assert json.loads(page.evaluate("localStorage.getItem('heron.apiKey')")) == KEY
    context.close()


def test_answer_streams_into_the_view(page: Any, server: RemoteServer, model_dir: Path) -> None:
    # long enough to span many frames: the tiny model writes 80 tokens in a few of them
    set_settings(page, temperature="0", max_tokens="320", system="")
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const c = document.querySelector('article.assistant:last-of-type .content');
            if (c && window.lengths.at(-1) !== c.textContent.length)
                window.lengths.push(c.textContent.length);
        }).observe(document.getElementById('messages'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    answer = send(page, "Hello")
    expect(answer).to_have_attribute("data-state", "done")
    lengths = page.evaluate("window.lengths")
    expected = api_answer(server, str(model_dir), "Hello", temperature=0, top_p=1, max_tokens=320)
    conversation = stored_conversation(page)
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    assert conversation[1]["content"] == expected
    # Shown while it was written: many growing partial renders before the whole answer.
    partial = [n for n in lengths if 0 < n < lengths[-1]]
    assert len(partial) >= 3 and partial == sorted(partial), lengths
    stats = answer.locator(".stats").inner_text()
    assert re.fullmatch(r"320 tokens · [0-9.]+ tok/s · first token \d+ ms · [0-9.]+ s · "
                        r"finish: length", stats), stats
    # Kept in the browser: a reload shows the same conversation.
    page.reload()
    expect(page.locator("article.message")).to_have_count(2)
    assert stored_conversation(page)[1]["content"] == expected
    # Regenerate replaces the last answer (greedy: with the same text).
    page.locator("article.assistant button.regenerate").click()
    expect(page.locator("article.assistant")).to_have_count(1)
    expect(page.locator("article.assistant")).to_have_attribute("data-state", "done")
    assert [m["content"] for m in stored_conversation(page)] == ["Hello", expected]


def test_stop_aborts_the_request_in_the_server(page: Any, server: RemoteServer) -> None:
    set_settings(page, temperature="0", max_tokens="900")
    generated_before = metric(server, "generation_tokens")
    answer = send(page, "Tell me a long story")
    expect(answer.locator(".content")).not_to_have_text("")
    page.click("#stop-button")
    expect(answer).to_have_attribute("data-state", "stopped")
    expect(page.locator("#stop-button")).to_be_hidden()
    deadline = time.monotonic() + 10
    while metric(server, "num_requests_running") != 0:
        assert time.monotonic() < deadline, "the request still runs after stop"
        time.sleep(0.1)
    generated = metric(server, "generation_tokens")
    time.sleep(1.0)
    assert metric(server, "generation_tokens") == generated  # nothing generates any more
    assert 0 < generated - generated_before < 900  # stopped before max_tokens
    assert answer.locator(".stats").inner_text().startswith("stopped")
    assert stored_conversation(page)[1]["state"] == "stopped"


@pytest.mark.parametrize("forced", [HTML_ANSWER, MARKDOWN_ANSWER])
def test_model_html_is_shown_as_text(page: Any, forced: str) -> None:
    """The server forces the model's answer (structured output: one choice) through the real
    stream; the page must show the HTML in it as text and run nothing."""
    extra = json.dumps({"structured_outputs": {"choice": [forced]}})
    set_settings(page, temperature="0", max_tokens="100", extra=extra)
    answer = send(page, "Say it")
    expect(answer).to_have_attribute("data-state", "done")
    assert stored_conversation(page)[1]["content"] == forced
    content = answer.locator(".content")
    assert content.locator("img, script, b, iframe").count() == 0
    assert page.locator("img").count() == 0
    assert page.dialogs == []  # no alert() ran
    if forced == HTML_ANSWER:
        assert content.inner_text() == HTML_ANSWER
    else:  # the Markdown is rendered, the HTML and the javascript: link are not
        assert content.locator("strong").inner_text() == "bold"
        assert content.locator("code").inner_text() == "<b>code</b>"
        assert content.locator("a").count() == 0
        assert content.inner_text() == (
            "bold <script>alert(2)</script> [x](javascript:alert(3)) <b>code</b>")


def test_reasoning_is_shown_apart_and_folded(page: Any) -> None:
    """A thinking model's reasoning (forced through the real stream by a regex, thinking off
    so that the regex is the whole output) shows in a folded "Thinking" block as plain text,
    above the answer; only the answer is sent back."""
    extra = json.dumps({"structured_outputs": {"regex": "<think><b>Plan</b> it\\.</think>Hi"},
                        "chat_template_kwargs": {"enable_thinking": False}})
    set_settings(page, temperature="0", max_tokens="100", extra=extra)
    answer = send(page, "Say it")
    expect(answer).to_have_attribute("data-state", "done")
    stored = stored_conversation(page)[1]
    assert (stored["reasoning"], stored["content"]) == ("<b>Plan</b> it.", "Hi")
    reasoning = answer.locator("details.reasoning")
    assert reasoning.get_attribute("open") is None  # folded once the answer came
    assert reasoning.locator("b").count() == 0  # text, not HTML
    reasoning.locator("summary").click()
    expect(reasoning.locator("div")).to_have_text("<b>Plan</b> it.")
    assert answer.locator(".content").inner_text() == "Hi"
    bodies: list[dict[str, Any]] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    send(page, "Again")
    expect(page.locator("article.assistant").nth(1)).to_have_attribute("data-state", "done")
    assert bodies[0]["messages"][1] == {"role": "assistant", "content": "Hi"}


RENDERER_CASES = [
    "<img src=x onerror=alert(1)>",
    "```html\n<script>alert(1)</script>\n```",
    "[click](javascript:alert(1)) [data](data:text/html,<script>alert(1)</script>)",
    "![x](https://example.invalid/x.png) <a href='https://x.invalid' onclick='alert(1)'>a</a>",
    "| <b>h</b> | h2 |\n|---|---|\n| <i onmouseover=alert(1)>c</i> | `<svg/onload=alert(1)>` |",
    "- item <style>*{}</style>\n  - nested **<u>x</u>**\n> quote <iframe src=x>",
    "# Title <img src=x>\n\nhttps://example.invalid/path?q=<x> and *em* _em_ ~~del~~",
]


def test_markdown_renderer_never_builds_html_from_text(page: Any) -> None:
    """The renderer itself (``web/markdown.js``, the function the stream uses), on harder
    inputs than a model is made to write above: only Markdown's own elements come out, no
    event-handler attribute, and links only to http(s)."""
    allowed = {"P", "BR", "PRE", "CODE", "H3", "H4", "H5", "H6", "HR", "BLOCKQUOTE", "UL", "OL",
               "LI", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD", "STRONG", "EM", "DEL", "A"}
    results = page.evaluate("""async (cases) => {
        const { renderMarkdown } = await import('./web/markdown.js');
        return cases.map((text) => {
            const box = document.createElement('div');
            box.appendChild(renderMarkdown(text));
            const nodes = [...box.querySelectorAll('*')];
            return {
                tags: [...new Set(nodes.map((n) => n.tagName))],
                attrs: [...new Set(nodes.flatMap((n) => [...n.attributes].map((a) => a.name)))],
                hrefs: [...box.querySelectorAll('a')].map((a) => a.href),
                text: box.textContent,
            };
        });
    }""", RENDERER_CASES)
    for case, result in zip(RENDERER_CASES, results):
        assert set(result["tags"]) <= allowed, (case, result)
        assert set(result["attrs"]) <= {"href", "rel", "target", "class", "start", "data-lang"}, (
            case, result)
        assert all(re.match(r"https?://[\w.]+\.invalid/", h) for h in result["hrefs"]), result
    assert "<script>alert(1)</script>" in results[1]["text"]  # code shown, as text
    assert results[0]["text"] == "<img src=x onerror=alert(1)>"
    assert results[2]["hrefs"] == []


@pytest.mark.slow
def test_screenshot_with_the_default_model(browser: Any, tmp_path: Path) -> None:
    """A real conversation with the default model (Gemma 3 270M, a base model: it continues
    text rather than chats); the README's screenshot is this page
    (``HERON_UPDATE_SCREENSHOT=1`` writes it to docs/chat-page.png)."""
    with RemoteServer([]) as srv:
        context = browser.new_context(viewport={"width": 960, "height": 760},
                                      color_scheme="light")
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(srv.base_url + "/")
        expect(page.locator("#model")).to_have_text("gemma-3-270m · context 32768 tokens")
        set_settings(page, temperature="0.7", top_p="0.95", max_tokens="100",
                     extra=json.dumps({"seed": 1, "repetition_penalty": 1.1}))
        answer = send(page, "Three facts about herons:\n\n1.")
        expect(answer).to_have_attribute("data-state", "done")
        assert len(stored_conversation(page)[1]["content"]) > 100
        assert re.fullmatch(r"100 tokens · [0-9.]+ tok/s · first token \d+ ms · [0-9.]+ s · "
                            r"finish: length", answer.locator(".stats").inner_text())
        shot = tmp_path / "chat-page.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("HERON_UPDATE_SCREENSHOT") == "1":
            SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)
        context.close()
