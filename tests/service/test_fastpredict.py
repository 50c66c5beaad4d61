"""The fast path of POST /predict/{model}: the common upload skips the framework's form parser, every other goes to the route.

Each test builds the real app on the bundled digits model and sends real PNG files through httpx's
ASGI transport, so the middleware stack (gate, size limit, fast path, routes) is the one served.
Starlette's form parser is replaced by one that counts its calls, to tell which path answered.
"""

from __future__ import annotations

import httpx
import pytest
from starlette import formparsers

from service.app import create_app
from service.fastpredict import FAST_MAX_BYTES
from service.runtime import resolve_device
from service.settings import Settings
from tests.service.conftest import png_bytes


@pytest.fixture
def form_parses(monkeypatch) -> list[int]:
    """How many times the routes' form parser ran (one entry per parse)."""
    calls: list[int] = []
    original = formparsers.MultiPartParser.parse

    async def counted(self):
        calls.append(1)
        return await original(self)

    monkeypatch.setattr(formparsers.MultiPartParser, "parse", counted)
    return calls


def _app(bundled_repository, **overrides):
    settings = Settings(repository=bundled_repository, watch_interval_s=0, max_files_per_request=8, **overrides)
    return create_app(settings, resolve_device("cpu"))


async def _post(app, url: str, **kwargs) -> httpx.Response:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(url, **kwargs)


def _digits(split, count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"d{i}.png", png_bytes(split.x[i][:, :, 0]), "image/png")) for i in range(count)]


async def test_the_common_upload_is_answered_without_the_form_parser_and_as_the_route_answers_it(
    bundled_repository, digits_test_split, form_parses
):
    files = _digits(digits_test_split, 3)
    fast = await _post(_app(bundled_repository), "/predict/digits?top_k=2", files=files)
    assert fast.status_code == 200, fast.text
    assert form_parses == [], "the common upload went through the routes' form parser"
    # A chunked body (no declared length) goes to the route: the same images must get the same answer.
    request = httpx.Request("POST", "http://test/predict/digits?top_k=2", files=files)
    body = request.read()

    async def chunks():
        yield body[:100]
        yield body[100:]

    routed = await _post(
        _app(bundled_repository),
        "/predict/digits?top_k=2",
        content=chunks(),
        headers={"content-type": request.headers["content-type"]},
    )
    assert form_parses == [1], "a body of undeclared length should have gone to the route"
    assert routed.status_code == 200, routed.text
    assert routed.json() == fast.json()
    assert [p["filename"] for p in fast.json()["predictions"]] == ["d0.png", "d1.png", "d2.png"]
    assert all(len(p["top_k"]) == 2 for p in fast.json()["predictions"])


@pytest.mark.parametrize(
    ("url", "files", "data", "detail"),
    [
        ("/predict/digits?top_k=0", True, None, "top_k"),
        ("/predict/digits?top_k=two", True, None, "top_k"),
        ("/predict/digits?version=latest", True, None, "version"),
        ("/predict/digits?version=0", True, None, "version"),
        ("/predict/digits", False, {"files": "not a file"}, "is a text field, not a file"),
        ("/predict/digits", False, {"other": "x"}, "files"),
    ],
)
async def test_requests_the_fast_path_does_not_take_get_the_routes_own_422(
    bundled_repository, digits_test_split, form_parses, url, files, data, detail
):
    r = await _post(_app(bundled_repository), url, files=_digits(digits_test_split, 1) if files else None, data=data)
    assert r.status_code == 422, r.text
    assert detail in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"garbage", "not valid multipart/form-data"),
        (b"--xyz\r\nno colon here\r\n\r\ndata\r\n--xyz--\r\n", "not valid multipart/form-data"),
        (b"--xyz\r\nContent-Disposition: form-data; name=files; filename=a.png\r\n\r\nnever closed", "files: Field required"),
    ],
)
async def test_a_malformed_body_read_by_the_fast_path_is_replayed_to_the_route_for_its_answer(
    bundled_repository, form_parses, body, detail
):
    r = await _post(
        _app(bundled_repository), "/predict/digits", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert r.status_code == 422, r.text
    assert detail in r.json()["detail"]
    assert form_parses == [1], "the route saw the whole body again"


async def test_service_errors_on_the_fast_path_answer_as_the_routes_do(bundled_repository, digits_test_split, form_parses):
    app = _app(bundled_repository)
    bad = [("files", ("notes.txt", b"plain text, not an image", "text/plain"))]
    r = await _post(app, "/predict/digits", files=bad)
    assert r.status_code == 415 and r.json() == {"detail": r.json()["detail"]} and "notes.txt" in r.json()["detail"]
    too_many = await _post(_app(bundled_repository), "/predict/digits", files=_digits(digits_test_split, 9))
    assert too_many.status_code == 422 and "9 files is more than the limit of 8" in too_many.json()["detail"]
    unknown = await _post(_app(bundled_repository), "/predict/digits?version=7", files=_digits(digits_test_split, 1))
    assert unknown.status_code == 404
    assert form_parses == [], "these were all fast-path answers"


async def test_with_an_api_key_a_wrong_key_is_answered_401_by_the_route_and_the_right_one_served_fast(
    bundled_repository, digits_test_split, form_parses
):
    files = _digits(digits_test_split, 1)
    wrong = await _post(_app(bundled_repository, api_key="s3cret"), "/predict/digits", files=files, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401
    bearer = await _post(
        _app(bundled_repository, api_key="s3cret"), "/predict/digits", files=files, headers={"Authorization": "Bearer s3cret"}
    )
    assert bearer.status_code == 200, bearer.text
    assert form_parses == [1], "the wrong key went to the route, the right one took the fast path"


async def test_uploads_over_the_fast_limit_stream_through_the_route(bundled_repository, digits_test_split, form_parses):
    padding = ("notes", (None, b"x" * FAST_MAX_BYTES))  # a text field beside the image, large enough to pass the limit
    r = await _post(_app(bundled_repository), "/predict/digits", files=[*_digits(digits_test_split, 1), padding])
    assert r.status_code == 200, r.text
    assert form_parses == [1]


@pytest.mark.parametrize("query", ["top_k=" + "1" * 5000, "version=" + "1" * 5000])
async def test_numbers_too_long_for_int_get_the_routes_422_not_a_500(bundled_repository, digits_test_split, query):
    r = await _post(_app(bundled_repository), f"/predict/digits?{query}", files=_digits(digits_test_split, 1))
    assert r.status_code == 422, r.text


async def test_a_client_that_hangs_up_mid_upload_is_counted_499_and_raises_nothing(bundled_repository, digits_test_split):
    app = _app(bundled_repository)
    request = httpx.Request("POST", "http://test/predict/digits", files=_digits(digits_test_split, 1))
    body = request.read()
    messages = [{"type": "http.request", "body": body[:50], "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict/digits",
        "raw_path": b"/predict/digits",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"test"),
            (b"content-type", request.headers["content-type"].encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    async with app.router.lifespan_context(app):
        await app(scope, receive, send)  # a hang-up is no error of the application's
        metrics = app.state.metrics.render().decode()
    assert sent == [], "nobody is left to answer"
    assert 'status="499"' in metrics


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("X-API-Key", "nope"), ("X-API-Key", "s3cret")], 401),  # the first of a repeated header counts, as for the route
        ([("X-API-Key", "s3cret"), ("X-API-Key", "nope")], 200),
    ],
)
async def test_a_repeated_key_header_is_judged_as_the_route_judges_it(bundled_repository, digits_test_split, headers, status):
    r = await _post(
        _app(bundled_repository, api_key="s3cret"), "/predict/digits", files=_digits(digits_test_split, 1), headers=headers
    )
    assert r.status_code == status, r.text


async def test_a_non_ascii_key_is_compared_as_the_route_compares_it(bundled_repository, digits_test_split):
    files = _digits(digits_test_split, 1)
    # HTTP headers are latin-1: the key's UTF-8 bytes are not the key.
    utf8 = await _post(
        _app(bundled_repository, api_key="clé"), "/predict/digits", files=files, headers={"X-API-Key": "clé".encode()}
    )
    assert utf8.status_code == 401
    latin = await _post(
        _app(bundled_repository, api_key="clé"), "/predict/digits", files=files, headers={"X-API-Key": "clé".encode("latin-1")}
    )
    assert latin.status_code == 200, latin.text


async def test_a_repeated_content_type_is_read_as_the_route_reads_it(bundled_repository, digits_test_split, form_parses):
    request = httpx.Request("POST", "http://test/", files=_digits(digits_test_split, 1))
    body = request.read()
    real = request.headers["content-type"]
    headers = [("content-type", "multipart/form-data; boundary=xyz"), ("content-type", real)]
    r = await _post(_app(bundled_repository), "/predict/digits", content=body, headers=headers)
    assert r.status_code == 422, r.text  # the first content-type names a boundary the body does not use


async def test_a_body_of_more_parts_than_the_form_parser_takes_goes_to_the_route_unsplit(bundled_repository, form_parses):
    parts = b"".join(b"--xyz\r\nContent-Disposition: form-data; name=files; filename=a\r\n\r\n\r\n" for _ in range(3000))
    r = await _post(
        _app(bundled_repository),
        "/predict/digits",
        content=parts + b"--xyz--\r\n",
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert r.status_code == 422, r.text
    assert form_parses == [1]


async def test_a_v2_version_too_long_for_int_gets_the_routes_400_not_a_500(bundled_repository):
    r = await _post(_app(bundled_repository), "/v2/models/digits/versions/" + "1" * 5000 + "/infer", json={"inputs": []})
    assert r.status_code == 400, r.text
    assert "error" in r.json()
