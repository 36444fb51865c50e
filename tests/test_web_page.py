"""The chat page's files and routes, without a browser (test_web_ui.py drives it in Chromium):
served at / with a strict CSP, public while the API wants a key, gone with --disable-web-ui,
self-contained (nothing from another origin) and small."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from heron.cli import build_parser, server_config_from_args
from heron.server import webui
from heron.server.app import build_app
from heron.server.config import ServerConfig

PAGE_BUDGET_BYTES = 40_000  # the page and its assets, uncompressed
BASE = "http://127.0.0.1:8000"  # a loopback Host, as a browser on this machine sends


def client(**config: object) -> TestClient:
    return TestClient(build_app(ServerConfig(**config)), base_url=BASE)  # type: ignore[arg-type]


def test_page_and_assets_are_served_with_a_strict_csp() -> None:
    c = client()
    page = c.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, media_type in webui.ASSETS.items():
        r = c.get(f"/web/{name}")
        assert (r.status_code, r.headers["content-type"]) == (200, media_type)
        assert r.content == (webui.WEB_DIR / name).read_bytes()
    for path in ("/web/index.html", "/web/../app.py", "/web/%2e%2e%2fapp.py", "/web/nope.js"):
        assert c.get(path).status_code == 404, path


def test_the_page_is_public_and_the_api_is_not() -> None:
    c = client(api_key="sk-x")
    assert c.get("/").status_code == 200
    assert c.get("/web/chat.js").status_code == 200
    assert c.get("/v1/models").status_code == 401
    assert c.get("/web/chat.js/../../v1/models").status_code in (401, 404)
    assert c.get("/metrics").status_code == 401


def test_disable_web_ui() -> None:
    args = build_parser(with_benchmarks=False).parse_args(["serve", "--disable-web-ui"])
    config = server_config_from_args(args)
    assert config.enable_web_ui is False
    c = TestClient(build_app(config), base_url=BASE)
    for path in ("/", "/index.html", "/web/chat.js"):
        r = c.get(path)
        assert r.status_code == 404 and r.json()["error"]["message"].startswith("Not Found")
    keyed = client(api_key="sk-x", enable_web_ui=False)
    assert keyed.get("/").status_code == 401  # no page: nothing is public but /health


def test_the_page_loads_nothing_from_elsewhere() -> None:
    html = (webui.WEB_DIR / "index.html").read_text()
    refs = re.findall(r"""(?:src|href)=["']([^"']*)["']""", html)
    assert refs and all(r.startswith(("web/", "data:")) for r in refs), refs
    css = (webui.WEB_DIR / "chat.css").read_text()
    assert "url(" not in css and "@import" not in css
    for name in ("chat.js", "markdown.js"):
        js = (webui.WEB_DIR / name).read_text()
        imports = re.findall(r"""^import .* from ["']([^"']+)["']""", js, re.M)
        assert all(i.startswith("./") for i in imports), imports
        assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js


def test_page_size(capsys: pytest.CaptureFixture[str]) -> None:
    size = webui.page_size()
    with capsys.disabled():
        print(f"\nchat page: {size} bytes (index.html + {', '.join(webui.ASSETS)})")
    assert size == sum(len((webui.WEB_DIR / n).read_bytes()) for n in ("index.html", *webui.ASSETS))
    assert size < PAGE_BUDGET_BYTES
