"""Self-hosted Swagger UI at /docs must be usable under a strict CSP."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser

import fastapi
import pytest
from fastapi.testclient import TestClient

from app.web import docs as docs_module
from app.web.docs import install_docs

TITLE = 'Secure <Your> "Server" & API'


class _PageScan(HTMLParser):
    """Collects what a CSP without 'unsafe-inline' would care about."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[tuple[str, str, str]] = []  # (tag, attr, value)
        self.inline_scripts: list[str] = []
        self.style_attrs: list[str] = []
        self.event_handlers: list[str] = []
        self.style_elements = 0
        self.title = ""
        self._in_script = False
        self._script_has_src = False
        self._script_text: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"src", "href", "action", "srcset", "data", "poster"}:
                self.urls.append((tag, name, value or ""))
            if name == "style":
                self.style_attrs.append(f"<{tag} style={value!r}>")
            if name.startswith("on"):
                self.event_handlers.append(f"<{tag} {name}={value!r}>")
        if tag == "script":
            self._in_script = True
            self._script_has_src = any(n == "src" for n, _ in attrs)
            self._script_text = []
        elif tag == "style":
            self.style_elements += 1
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._in_script:
            text = "".join(self._script_text)
            if text.strip() or not self._script_has_src:
                self.inline_scripts.append(text)
            self._in_script = False
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self._script_text.append(data)
        if self._in_title:
            self.title += data


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = fastapi.FastAPI(title="docs test", docs_url=None, redoc_url=None)

    @app.get("/api/ping")
    async def ping() -> dict[str, str]:
        return {"status": "ok"}

    install_docs(app, title=TITLE)
    with TestClient(app) as c:
        yield c


def _scan(client: TestClient) -> tuple[str, _PageScan]:
    resp = client.get("/docs")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    scan = _PageScan()
    scan.feed(resp.text)
    scan.close()
    return resp.text, scan


def test_docs_page_only_same_origin_assets(client: TestClient) -> None:
    body, scan = _scan(client)
    assert "http://" not in body and "https://" not in body
    assert scan.urls, "page should reference its assets"
    for tag, attr, value in scan.urls:
        assert value.startswith("/") and not value.startswith("//"), (tag, attr, value)
    script_srcs = [v for t, a, v in scan.urls if t == "script" and a == "src"]
    assert script_srcs == ["/docs/assets/swagger-ui-bundle.js", "/docs/init.js"]
    css = [v for t, a, v in scan.urls if t == "link" and v.endswith(".css")]
    assert "/docs/assets/swagger-ui.css" in css


def test_docs_page_has_nothing_inline(client: TestClient) -> None:
    body, scan = _scan(client)
    assert scan.inline_scripts == []
    assert scan.style_attrs == []
    assert scan.event_handlers == []
    assert scan.style_elements == 0
    assert not re.search(r"\sstyle\s*=", body, re.IGNORECASE)
    assert "javascript:" not in body.lower()
    assert "<base" not in body.lower()


def test_docs_page_title_is_escaped(client: TestClient) -> None:
    body, scan = _scan(client)
    assert scan.title == TITLE
    assert "Secure &lt;Your&gt; &quot;Server&quot; &amp; API" in body
    assert "<Your>" not in body


def test_docs_page_sets_no_relaxed_csp(client: TestClient) -> None:
    # The site-wide middleware applies the strict policy; /docs needs no exception.
    resp = client.get("/docs")
    assert "content-security-policy" not in resp.headers


def test_bundle_js_is_served(client: TestClient) -> None:
    resp = client.get("/docs/assets/swagger-ui-bundle.js")
    assert resp.status_code == 200
    assert "javascript" in resp.headers["content-type"]
    assert "SwaggerUIBundle" in resp.text
    assert len(resp.content) > 100_000


def test_css_is_served(client: TestClient) -> None:
    resp = client.get("/docs/assets/swagger-ui.css")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/css")
    assert ".swagger-ui" in resp.text


def test_init_js(client: TestClient) -> None:
    resp = client.get("/docs/init.js")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/javascript")
    assert '"/openapi.json"' in resp.text
    assert "SwaggerUIBundle(" in resp.text
    assert 'dom_id: "#swagger-ui"' in resp.text
    assert "validatorUrl: null" in resp.text
    assert "http://" not in resp.text and "https://" not in resp.text


def test_docs_routes_not_in_schema(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/api/ping" in schema["paths"]
    assert not any(p.startswith("/docs") for p in schema["paths"])


def test_requires_builtin_docs_disabled() -> None:
    with pytest.raises(ValueError):
        install_docs(fastapi.FastAPI(redoc_url=None), title="x")


def test_init_js_oas31_compat_only_for_swagger_ui_4(client: TestClient) -> None:
    # FastAPI emits OpenAPI 3.1, which Swagger UI < 5 refuses to render.
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1.")
    major = docs_module._swagger_ui_major(docs_module._swagger_ui_dist())
    assert major is not None and major >= 4
    js = client.get("/docs/init.js").text
    assert ("responseInterceptor: asOas30" in js) == (major < 5)


@pytest.mark.parametrize(
    ("name", "major"),
    [("swagger-ui-4.15.5", 4), ("swagger-ui-5.31.0", 5), ("dist", None)],
)
def test_swagger_ui_major(name: str, major: int | None) -> None:
    assert docs_module._swagger_ui_major(docs_module.Path(name)) == major


def test_root_path_prefixes_urls() -> None:
    app = fastapi.FastAPI(docs_url=None, redoc_url=None)
    install_docs(app, title="x")
    with TestClient(app, root_path="/prefix") as c:
        body = c.get("/docs").text
        assert 'src="/prefix/docs/assets/swagger-ui-bundle.js"' in body
        assert 'src="/prefix/docs/init.js"' in body
        assert '"/prefix/openapi.json"' in c.get("/docs/init.js").text
