"""The page's files as the service answers them: headers, the allow-list, nothing inline or from elsewhere."""

from __future__ import annotations

import fnmatch
import re
import tomllib

import httpx
import pytest

from service.app import create_app
from service.page import ASSETS, STATIC
from service.runtime import resolve_device
from service.settings import Settings
from tests.conftest import BUNDLED_REPOSITORY, ROOT


@pytest.fixture
async def client():
    app = create_app(Settings(repository=BUNDLED_REPOSITORY, watch_interval_s=0, api_key="page-key"), resolve_device("cpu"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


def _assert_page_headers(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    # Every source the policy allows is this origin, or blob: for the user's own thumbnails.
    sources = {word for directive in csp.split(";") for word in directive.split()[1:]}
    assert sources <= {"'self'", "'none'", "blob:"}, sources
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_the_page_and_every_file_it_names_are_served_with_its_policy_and_without_the_api_key(client):
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    _assert_page_headers(page)
    named = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    files = [url for url in named if url.startswith("/static/")]
    assert {f.removeprefix("/static/") for f in files} == set(ASSETS)
    for url in files:
        response = await client.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"] == ASSETS[url.removeprefix("/static/")]
        _assert_page_headers(response)
    # The API itself still needs the key the page asks for.
    assert (await client.get("/models")).status_code == 401


async def test_only_the_page_files_are_served(client):
    for name in ("index.html", "..%2Fpage.py", "%2E%2E%2Fsettings.py", "nothing.js"):
        response = await client.get(f"/static/{name}")
        assert response.status_code == 404, name
        assert "detail" in response.json()


def test_the_page_has_no_inline_script_or_style_and_fetches_nothing_from_elsewhere():
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "an inline script"
    assert "<style" not in html and " style=" not in html and not re.search(r"\son\w+=", html)
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I) or path.suffix == ".svg", path.name
    script = (STATIC / "app.js").read_text()
    # Server text is set as text, never parsed as HTML, and nothing is evaluated.
    assert not re.search(r"\binnerHTML\b|\bouterHTML\b|insertAdjacentHTML|\beval\(|new Function", script)
    assert "localStorage" not in script, "the API key is kept for the browser session only"


def test_every_page_file_is_packaged():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    for path in STATIC.iterdir():
        relative = path.relative_to(STATIC.parent).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), f"{relative} is not in [tool.setuptools.package-data]"


async def test_models_carry_the_parity_figures_of_their_metadata(client):
    body = (await client.get("/models", headers={"X-API-Key": "page-key"})).json()
    digits = next(m for m in body["models"] if m["name"] == "digits")
    assert digits["parity"]["passed"] is True
    assert digits["parity"]["images"] == 270
    assert digits["parity"]["max_abs_difference"] < 1e-4
