"""The page at `/` in a real headless Chromium against a real service on a free port."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from kos_core.artifact import ModelMetadata
from kos_core.layout import model_path
from tests.browser.conftest import WORDS
from tests.conftest import BUNDLED_REPOSITORY, ROOT, LiveServer

pytestmark = pytest.mark.usefixtures("browser")

EXAMPLES = ROOT / "examples" / "digits"
DIGIT_FILES = sorted(EXAMPLES.glob("*.png"))
DIGIT_OF = {word: str(i) for i, word in enumerate(WORDS)}


def expect(*args):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(*args)


def open_page(page, server: LiveServer) -> None:
    page.goto(server.url + "/")
    expect(page.locator("#workspace")).to_be_visible()


def wait_for_results(page, count: int) -> None:
    expect(page.locator(".result")).to_have_count(count)
    expect(page.locator(".result.pending")).to_have_count(0, timeout=30_000)


def card(page, filename: str):
    return page.locator(".result").filter(has=page.locator(".filename", has_text=filename))


def top_label(page, filename: str) -> str:
    return card(page, filename).locator(".bar.top .label").inner_text()


def percentages(page, filename: str) -> list[float]:
    return [float(text.rstrip(" %")) for text in card(page, filename).locator(".bar .percent").all_inner_texts()]


@pytest.fixture(scope="module")
def two_model_server(two_models) -> LiveServer:
    server = LiveServer(two_models, [])
    try:
        server.wait_until_listening()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def error_repository(tmp_path_factory) -> Path:
    """The bundled digits model beside `broken`, a version whose file is no ONNX model at all."""
    root = tmp_path_factory.mktemp("errors")
    shutil.copytree(BUNDLED_REPOSITORY / "digits", root / "digits")
    broken = model_path(root, "broken", 1)
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not an onnx model")
    return root


def test_the_ten_example_digits_each_get_their_digit_and_bars_summing_to_100_percent(page, bundled_server):
    open_page(page, bundled_server)
    page.locator("#top-k").fill("10")
    page.locator("#top-k").dispatch_event("change")
    page.locator("#files").set_input_files(DIGIT_FILES)
    wait_for_results(page, 10)
    expect(page.locator(".result.done")).to_have_count(10)
    for path in DIGIT_FILES:
        assert top_label(page, path.name) == DIGIT_OF[path.stem], path.name
        shown = percentages(page, path.name)
        assert len(shown) == 10
        assert sum(shown) == pytest.approx(100, abs=1.0), (path.name, shown)
        assert shown == sorted(shown, reverse=True)
        # The time the request took, and which model and version answered.
        assert card(page, path.name).locator(".timing").inner_text().startswith("digits v1 · ")
        assert card(page, path.name).locator(".timing").inner_text().endswith(" ms")
    # The model card: what the metadata and /models say.
    model_card = page.locator("#card")
    expect(model_card.locator("h2")).to_contain_text("digits")
    expect(model_card).to_contain_text("8 × 8 px, grayscale, bilinear resize")
    expect(model_card).to_contain_text("CPUExecutionProvider")
    expect(model_card).to_contain_text("float32 (model.onnx)")
    expect(model_card.locator(".labels li")).to_have_text([str(i) for i in range(10)])
    accuracy = ModelMetadata.from_metadata_props(
        ort.InferenceSession(str(model_path(BUNDLED_REPOSITORY, "digits", 1))).get_modelmeta().custom_metadata_map
    ).metrics["test_accuracy"]
    expect(model_card.locator("table.metrics")).to_contain_text(f"accuracy{accuracy * 100:.2f} %")
    expect(model_card.locator("table.parity")).to_contain_text("images270")
    expect(model_card.locator("table.parity")).to_contain_text("passedyes")


def test_switching_models_asks_the_other_model_about_the_same_images(page, two_model_server):
    open_page(page, two_model_server)
    expect(page.locator("#model option")).to_have_text(["digits", "words"])
    three, seven = EXAMPLES / "three.png", EXAMPLES / "seven.png"
    page.locator("#files").set_input_files([three, seven])
    wait_for_results(page, 2)
    assert (top_label(page, "three.png"), top_label(page, "seven.png")) == ("3", "7")

    page.locator("#model").select_option("words")
    expect(page.locator(".result.done[data-model=words]")).to_have_count(2)
    assert (top_label(page, "three.png"), top_label(page, "seven.png")) == ("three", "seven")
    expect(page.locator("#card h2")).to_contain_text("words")
    expect(page.locator("#card .labels li")).to_have_text(WORDS)
    expect(card(page, "three.png").locator(".timing")).to_contain_text("words v1")

    page.locator("#model").select_option("digits")
    expect(page.locator(".result.done[data-model=digits]")).to_have_count(2)
    assert top_label(page, "three.png") == "3"


def test_a_text_file_named_png_shows_the_415_on_its_image_and_the_page_goes_on_working(
    page, start_server, error_repository, tmp_path
):
    server = start_server(error_repository, "--max-image-pixels", "1000")
    notes = tmp_path / "notes.png"
    notes.write_text("these are notes, not a picture\n")
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8), mode="L").save(big)
    open_page(page, server)
    page.locator("#model").select_option("digits")
    page.locator("#files").set_input_files([notes, EXAMPLES / "three.png", big])
    wait_for_results(page, 3)

    failed = card(page, "notes.png")
    expect(failed).to_have_class(re.compile(r"\bfailed\b"))
    expect(failed.locator(".error")).to_contain_text("415: notes.png")
    expect(failed.locator(".retry")).to_be_visible()
    expect(card(page, "big.png").locator(".error")).to_contain_text("413: big.png")
    assert top_label(page, "three.png") == "3"

    # The page goes on: a later upload is classified, and the failed cards keep their message.
    page.locator("#files").set_input_files([EXAMPLES / "four.png"])
    wait_for_results(page, 4)
    assert top_label(page, "four.png") == "4"
    expect(failed.locator(".error")).to_contain_text("415: notes.png")


def test_a_model_that_failed_to_load_shows_the_503_and_what_only_an_operator_can_fix_on_the_image(
    page, start_server, error_repository
):
    server = start_server(error_repository)
    open_page(page, server)
    page.locator("#model").select_option("broken")
    expect(page.locator("#card .badge")).to_have_text("failed")
    expect(page.locator("#card")).to_contain_text("model.onnx")
    page.locator("#files").set_input_files([EXAMPLES / "five.png"])
    wait_for_results(page, 1)
    error = card(page, "five.png").locator(".error")
    expect(error).to_contain_text("503: model 'broken'")
    expect(error).to_contain_text("an operator must fix or replace its file")

    # The same image, asked of a working model from the same page.
    page.locator("#model").select_option("digits")
    expect(page.locator(".result.done")).to_have_count(1)
    assert top_label(page, "five.png") == "5"
    expect(error).to_be_hidden()


def test_with_an_api_key_the_page_asks_once_shows_the_401_and_keeps_the_key_for_the_tab_only(page, start_server):
    server = start_server(BUNDLED_REPOSITORY, "--api-key", "s3cret-key")
    page.goto(server.url + "/")
    expect(page.locator("#key-panel")).to_be_visible()
    expect(page.locator("#workspace")).to_be_hidden()
    expect(page.locator("#key-error")).to_be_hidden()
    expect(page.locator("#key-input")).to_be_focused()

    page.locator("#key-input").fill("wrong-key")
    page.locator("#key-input").press("Enter")
    expect(page.locator("#key-error")).to_contain_text("401: missing or wrong API key")
    expect(page.locator("#workspace")).to_be_hidden()

    page.locator("#key-input").fill("s3cret-key")
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#workspace")).to_be_visible()
    expect(page.locator("#key-panel")).to_be_hidden()
    page.locator("#files").set_input_files([EXAMPLES / "nine.png"])
    wait_for_results(page, 1)
    assert top_label(page, "nine.png") == "9"
    assert page.evaluate("sessionStorage.getItem('kos-api-key')") == "s3cret-key"
    assert page.evaluate("localStorage.length") == 0

    # Asked once: a reload in the same tab does not ask again.
    page.reload()
    expect(page.locator("#workspace")).to_be_visible()
    expect(page.locator("#key-panel")).to_be_hidden()

    # A key that stops working shows the 401 on the image and asks again.
    page.evaluate("sessionStorage.setItem('kos-api-key', 'rotated-away')")
    page.locator("#files").set_input_files([EXAMPLES / "two.png"])
    wait_for_results(page, 1)
    expect(card(page, "two.png").locator(".error")).to_contain_text("401: missing or wrong API key")
    expect(page.locator("#key-panel")).to_be_visible()
    page.locator("#key-input").fill("s3cret-key")
    page.locator("#key-input").press("Enter")
    expect(card(page, "two.png").locator(".bar.top .label")).to_have_text("2")


def test_another_browser_session_is_asked_for_the_key_again(browser, start_server):
    server = start_server(BUNDLED_REPOSITORY, "--api-key", "s3cret-key")
    for _ in range(2):
        context = browser.new_context()
        try:
            tab = context.new_page()
            tab.goto(server.url + "/")
            expect(tab.locator("#key-panel")).to_be_visible()
            tab.locator("#key-input").fill("s3cret-key")
            tab.locator("#key-input").press("Enter")
            expect(tab.locator("#workspace")).to_be_visible()
        finally:
            context.close()


def test_the_page_works_by_keyboard(page, bundled_server):
    # A listener from the start turns on Playwright's file-chooser interception before any key is
    # pressed; enabled only by expect_file_chooser it can miss a chooser opened at once.
    page.on("filechooser", lambda chooser: None)
    open_page(page, bundled_server)
    focused = []
    for _ in range(12):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
        if focused[-1] == "choose":
            break
    assert focused[-1] == "choose", focused
    assert {"model", "version", "top-k"} <= set(focused), focused
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files([EXAMPLES / "six.png"])
    wait_for_results(page, 1)
    assert top_label(page, "six.png") == "6"


def _transfer_script(event: str) -> str:
    """Dispatch `event` carrying one file, as the browser does for a paste or a drop."""
    create = (
        "new ClipboardEvent('paste', {clipboardData: dt, bubbles: true})"
        if event == "paste"
        else "new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})"
    )
    target = "document" if event == "paste" else "document.getElementById('drop')"
    return (
        "([name, bytes]) => { const dt = new DataTransfer();"
        " dt.items.add(new File([new Uint8Array(bytes)], name, {type: 'image/png'}));"
        f" {target}.dispatchEvent({create}); }}"
    )


@pytest.mark.parametrize("event", ["paste", "drop"])
def test_a_pasted_or_dropped_image_is_classified(page, bundled_server, event):
    open_page(page, bundled_server)
    data = (EXAMPLES / "eight.png").read_bytes()
    page.evaluate(_transfer_script(event), [f"{event}d-eight.png", list(data)])
    wait_for_results(page, 1)
    assert top_label(page, f"{event}d-eight.png") == "8"


def test_a_phone_width_screen_needs_no_sideways_scrolling(browser, bundled_server):
    context = browser.new_context(viewport={"width": 360, "height": 740}, device_scale_factor=2, is_mobile=True)
    try:
        tab = context.new_page()
        open_page(tab, bundled_server)
        tab.locator("#files").set_input_files(DIGIT_FILES[:3])
        wait_for_results(tab, 3)
        assert tab.evaluate("document.documentElement.scrollWidth") <= 360
        for selector in ("#choose", "#model", ".result .bar.top", "#card h2"):
            box = tab.locator(selector).first.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, (selector, box)
    finally:
        context.close()


def test_a_screenshot_of_the_page_with_results(page, bundled_server, tmp_path):
    """Set KOS_PAGE_SCREENSHOT=docs/page.png to write the README's picture."""
    open_page(page, bundled_server)
    page.locator("#files").set_input_files(sorted(DIGIT_FILES, key=lambda path: DIGIT_OF[path.stem]))
    wait_for_results(page, 10)
    expect(page.locator(".result.done")).to_have_count(10)
    expect(page.locator(".result .filename")).to_have_text([f"{word}.png" for word in WORDS])
    target = Path(os.environ.get("KOS_PAGE_SCREENSHOT") or tmp_path / "page.png")
    page.screenshot(path=str(target), full_page=True)
    with Image.open(target) as shot:
        assert shot.width == 1280 and shot.height >= 900
        # Not a blank page: many distinct colours (text, bars, thumbnails).
        assert len(shot.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50
