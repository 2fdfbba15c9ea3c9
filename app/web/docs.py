"""Self-hosted Swagger UI that works under a strict Content-Security-Policy.

FastAPI's built-in ``get_swagger_ui_html`` loads Swagger UI from a CDN and
boots it with an inline ``<script>``; both are blocked by our policy
(``script-src 'self'``, no ``'unsafe-inline'``, no remote origins). Instead we:

* serve the Swagger UI dist files shipped in the ``swagger-ui-bundle`` PyPI
  package from ``/docs/assets`` (same origin, no CDN, works offline);
* serve ``/docs`` as a static HTML shell with no inline script, no inline
  style attributes and no inline event handlers;
* boot Swagger UI from a tiny external script served at ``/docs/init.js``.

Usage::

    app = FastAPI(docs_url=None, redoc_url=None)
    install_docs(app, title="Secure Your Server")

No CSP relaxation is needed (checked in Chromium with Swagger UI 4.15.5 and
5.31.0: zero violations): Swagger UI only styles elements through the CSSOM
(``element.style``), which ``style-src 'self'`` permits, and its inline images
are ``data:`` URIs, which ``img-src 'self' data:`` permits. The online
validator badge (a remote image) is disabled with ``validatorUrl: null``.

The assets come from whatever provides the ``swagger_ui_bundle`` module:
``swagger-ui-bundle`` 1.1.0 (Swagger UI 4.15.5) or its maintained fork
``swagger-ui-bundle-v2`` (Swagger UI 5.x, same module name). Swagger UI 4 cannot
render OpenAPI 3.1, which FastAPI emits, so with a 4.x dist ``/docs/init.js``
relabels the schema as 3.0.3 for display only (see ``_OAS31_COMPAT_JS``).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import fastapi
import swagger_ui_bundle
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

__all__ = ["install_docs"]

DOCS_PATH = "/docs"
ASSETS_PATH = f"{DOCS_PATH}/assets"
ASSETS_NAME = "docs-assets"
INIT_JS_PATH = f"{DOCS_PATH}/init.js"

_INIT_JS_TEMPLATE = """\
// Boots Swagger UI for /docs. Served as an external script so the page
// needs no inline JavaScript under the site's Content-Security-Policy.
"use strict";
(function () {
  var OPENAPI_URL = %(openapi_url)s;
%(compat)s
  function boot() {
    window.ui = SwaggerUIBundle({
      url: OPENAPI_URL,
      dom_id: "#swagger-ui",
      deepLinking: true,
      // The default validator is a remote image (validator.swagger.io):
      // img-src 'self' data: would block it, and the docs never call out.
      validatorUrl: null,
      // BaseLayout without the standalone preset: no "Explore" bar that
      // could load arbitrary remote specs.
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout",%(extra)s
      docExpansion: "list",
      defaultModelsExpandDepth: 0,
      displayRequestDuration: true
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", boot);
  } else {
    boot();
  }
})();
"""

# Swagger UI < 5 refuses OpenAPI 3.1 documents ("Unable to render this
# definition"), and FastAPI emits "openapi": "3.1.0". swagger-ui-bundle 1.1.0
# (the newest release of that package) ships Swagger UI 4.15.5, so for 4.x we
# relabel the schema as 3.0.3 *for display only*; /openapi.json is unchanged.
# Swagger UI 4 reads the spec from ``res.text`` of the download response.
_OAS31_COMPAT_JS = """\
  // Swagger UI 4 cannot render OpenAPI 3.1: show the schema as 3.0.3.
  function asOas30(res) {
    try {
      if (res && res.ok && typeof res.text === "string" &&
          new URL(res.url, window.location.href).pathname === OPENAPI_URL) {
        var spec = JSON.parse(res.text);
        if (typeof spec.openapi === "string" && spec.openapi.indexOf("3.1.") === 0) {
          spec.openapi = "3.0.3";
          res.text = JSON.stringify(spec);
          res.body = res.obj = spec;
        }
      }
    } catch (e) { /* leave the response untouched */ }
    return res;
  }
"""
_OAS31_COMPAT_OPTION = "\n      responseInterceptor: asOas30,"


def _swagger_ui_dist() -> Path:
    """Directory holding swagger-ui.css, swagger-ui-bundle.js, ... ."""
    path = Path(str(swagger_ui_bundle.swagger_ui_path))
    if not (path / "swagger-ui-bundle.js").is_file():  # pragma: no cover
        raise RuntimeError(
            f"swagger-ui-bundle dist not found at {path}; "
            "is the 'swagger-ui-bundle' package installed correctly?"
        )
    return path


def _swagger_ui_major(dist: Path) -> int | None:
    """Swagger UI major version from the dist folder name (``swagger-ui-4.15.5``)."""
    match = re.fullmatch(r"swagger-ui-(\d+)\.\d+\.\d+", dist.name)
    return int(match.group(1)) if match else None


def _root_path(request: fastapi.Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _render_page(*, title: str, root_path: str, openapi_url: str) -> str:
    def url(path: str) -> str:
        return html.escape(root_path + path, quote=True)

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="{url(ASSETS_PATH + "/swagger-ui.css")}">
<link rel="stylesheet" href="{url(ASSETS_PATH + "/index.css")}">
<link rel="icon" type="image/png" sizes="32x32" href="{url(ASSETS_PATH + "/favicon-32x32.png")}">
<link rel="icon" type="image/png" sizes="16x16" href="{url(ASSETS_PATH + "/favicon-16x16.png")}">
</head>
<body>
<noscript>The interactive API documentation needs JavaScript. The raw OpenAPI schema is at
<a href="{url(openapi_url)}">{html.escape(openapi_url)}</a>.</noscript>
<div id="swagger-ui"></div>
<script src="{url(ASSETS_PATH + "/swagger-ui-bundle.js")}" charset="utf-8"></script>
<script src="{url(INIT_JS_PATH)}" charset="utf-8"></script>
</body>
</html>
"""


def install_docs(app: fastapi.FastAPI, *, title: str) -> None:
    """Serve CSP-friendly Swagger UI at ``/docs`` on *app*.

    The app must have been created with ``docs_url=None, redoc_url=None`` so
    FastAPI does not register its own CDN-based ``/docs``. The OpenAPI schema
    is read from ``app.openapi_url`` (``/openapi.json`` by default).
    """
    openapi_url = _openapi_url(app)
    dist = _swagger_ui_dist()
    major = _swagger_ui_major(dist)
    app.mount(ASSETS_PATH, StaticFiles(directory=dist), name=ASSETS_NAME)
    _add_page(app, title, openapi_url)
    _add_init_js(app, openapi_url, needs_oas31_compat=major is not None and major < 5)


def _openapi_url(app: fastapi.FastAPI) -> str:
    """Where the app serves its schema, once it is sure FastAPI serves no docs of its own."""
    if app.docs_url is not None:
        raise ValueError(
            "install_docs() replaces FastAPI's built-in docs; "
            "create the app with FastAPI(docs_url=None, redoc_url=None)"
        )
    if not app.openapi_url:
        raise ValueError("install_docs() needs the OpenAPI schema (openapi_url)")
    return app.openapi_url


def _add_page(app: fastapi.FastAPI, title: str, openapi_url: str) -> None:
    @app.get(DOCS_PATH, include_in_schema=False, response_class=HTMLResponse)
    async def swagger_ui_page(request: fastapi.Request) -> HTMLResponse:
        return HTMLResponse(
            _render_page(
                title=title, root_path=_root_path(request), openapi_url=openapi_url
            ),
            headers={"Cache-Control": "no-cache"},
        )


def _render_init_js(openapi_url: str, *, needs_oas31_compat: bool) -> str:
    # json.dumps yields a valid JS string literal; escape "<" for good measure.
    literal = json.dumps(openapi_url).replace("<", "\\u003c")
    return _INIT_JS_TEMPLATE % {
        "openapi_url": literal,
        "compat": _OAS31_COMPAT_JS if needs_oas31_compat else "",
        "extra": _OAS31_COMPAT_OPTION if needs_oas31_compat else "",
    }


def _add_init_js(app: fastapi.FastAPI, openapi_url: str, *, needs_oas31_compat: bool) -> None:
    @app.get(INIT_JS_PATH, include_in_schema=False)
    async def swagger_ui_init(request: fastapi.Request) -> Response:
        return Response(
            _render_init_js(_root_path(request) + openapi_url, needs_oas31_compat=needs_oas31_compat),
            media_type="application/javascript",
            headers={"Cache-Control": "no-cache"},
        )
