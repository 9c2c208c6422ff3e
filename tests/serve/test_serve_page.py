"""The page of ``cnnlab serve`` in a real browser (Playwright driving Debian's chromium):
a user picks each run, uploads an image and sees its answer drawn; a bad file is one line
on the page and the next good one still works; nothing is fetched from elsewhere.

Chromium, the page's problem collector and the server come from ``tests/serve/conftest.py``.
Screenshots go to pytest's tmp dir.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.serve.conftest import CANVAS_COLOURS, watched_page


@pytest.fixture
def page(browser, runs_server):
    """A fresh page on the server; fails the test on any script error or console error, and
    on any request that leaves the server."""
    opened = watched_page(browser, runs_server.url)
    opened.wait_for_selector("#run-list button")
    yield opened
    opened.close()
    problems = opened.problems
    assert not [p for p in problems if "status of 4" not in p], problems  # 4xx: asked for


def image_of(folder: Path) -> Path:
    return sorted(p for p in folder.rglob("*.png") if "masks" not in p.parts)[0]


DRAWN = """() => { const c = document.getElementById('overlay');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return true; return false; }"""


def wait_until(page, predicate: str, timeout: float = 30.0) -> None:
    """Poll the JavaScript function ``predicate`` until it returns true. Not
    ``page.wait_for_function``: that evaluates a string inside the page, which the page's
    Content-Security-Policy (script-src 'self') rightly refuses."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout:.0f} s: {predicate}")
        time.sleep(0.05)


def wait_drawn(page) -> None:
    """Until something is drawn on the canvas over the image (it is drawn once both the
    answer and the image have arrived, in either order)."""
    wait_until(page, DRAWN)


def answered(page, name: str) -> None:
    """Wait until the page shows the answer for the file ``name``."""
    wait_until(page, f"() => document.getElementById('curl').textContent.includes('@{name} ')")


def choose(page, task: str) -> None:
    page.click(f"#run-list button:has(.badge.{task})")
    page.wait_for_selector(f"#run-details .badge.{task}")


def test_classify_shows_top_classes_and_each_class_heat_map(
    page, runs_server, serve_runs, tmp_path
):
    """The top classes, each one's heat map, and where the model looks: the top class's
    Grad-CAM in jet over the (grey) digit, so that every pixel of it is coloured (a grey
    map over a grey image would have none), with its scale and what high means."""
    buttons = page.locator("#run-list button")
    assert buttons.count() == 3
    assert sorted(buttons.nth(i).locator(".badge").inner_text() for i in range(3)) == [
        "CLASSIFY",
        "DETECT",
        "SEGMENT",
    ]
    choose(page, "classify")
    image = image_of(serve_runs["classify_data"])
    page.set_input_files("#file", image)
    page.wait_for_selector("#top1")
    wait_until(page, "() => document.getElementById('peak').textContent.length > 0")
    run_id = page.locator("#run-list button[aria-pressed=true]").get_attribute("data-run")
    with image.open("rb") as handle:
        answer = httpx.post(
            runs_server.url + "api/predict",
            data={"run": run_id, "topk": "10", "heatmaps": "true"},
            files={"file": (image.name, handle, "image/png")},
        ).json()
    best = answer["top"][0]
    assert page.inner_text("#top1").startswith(best["class"])
    assert page.locator("#top li").count() == 10
    wait_drawn(page)  # the top class's heat map
    first = page.inner_text("#peak")
    assert first.startswith(f"P({best['class']})")
    assert Image.open(image).mode in ("L", "1")  # grey: colour can come from the map alone
    wait_until(page, f"() => ({CANVAS_COLOURS})('gradcam') !== null")
    pixels, drawn, coloured = page.evaluate(CANVAS_COLOURS, "gradcam")
    assert pixels > 0 and drawn == pixels and coloured == drawn
    assert page.inner_text(".where-it-looks figcaption").startswith(
        f"Where it looks: Grad-CAM of {best['class']} at "
    )
    assert page.inner_text("#gradcam-what").startswith("High (red, 1 = the map's peak)")
    assert page.is_visible(".where-it-looks .colourbar")
    other = answer["top"][1]["class"]
    page.check(f"#top input[value='{other}']")
    wait_until(page, f"() => document.getElementById('peak').textContent.startsWith('P({other})')")
    page.screenshot(path=tmp_path / "classify.png", full_page=True)
    assert "answered in" in page.inner_text("#status")


def test_segment_and_detect_draw_their_answers(page, serve_runs, tmp_path) -> None:
    choose(page, "segment")
    page.set_input_files("#file", image_of(serve_runs["segment_data"]))
    page.wait_for_selector("#fractions li")
    assert page.locator("#fractions li").count() == 4  # background and three shapes
    shares = page.locator("#fractions .num").all_inner_texts()
    assert abs(sum(float(s.rstrip("%")) for s in shares) - 100) < 0.5
    page.screenshot(path=tmp_path / "segment.png", full_page=True)

    choose(page, "detect")  # the same image goes through the newly chosen run
    page.wait_for_selector("#detections li")
    # A name of its own: the segmentation image was also 0.png, and waiting for "@0.png"
    # would take the answer already on the page for the new one.
    image = tmp_path / "detect-image.png"
    shutil.copyfile(image_of(serve_runs["detect_data"]), image)
    page.set_input_files("#file", image)
    answered(page, image.name)
    # the lowest threshold shows every box the server sent
    page.eval_on_selector(
        "input[aria-label='score threshold']",
        "s => { s.value = s.min; s.dispatchEvent(new Event('input')); }",
    )
    page.wait_for_selector("#detections li .num")
    assert page.locator("#detections li .num").count() > 0
    wait_drawn(page)  # the boxes
    page.screenshot(path=tmp_path / "detect.png", full_page=True)


def test_a_bad_file_is_one_line_and_the_next_good_one_works(page, serve_runs, tmp_path) -> None:
    choose(page, "classify")
    page.set_input_files(
        "#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not a png"}]
    )
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert message.startswith("400: notes.png:") and "\n" not in message
    page.screenshot(path=tmp_path / "error.png", full_page=True)
    page.set_input_files("#file", image_of(serve_runs["classify_data"]))
    page.wait_for_selector("#top1")
    assert page.is_hidden("#error")


FITS = "() => document.documentElement.scrollWidth <= window.innerWidth"
# every image the user can see has loaded (a broken one has naturalWidth 0); the figures
# inside a closed <details> are not seen
NO_BROKEN_IMAGE = """() => [...document.images].every((img) =>
    !img.checkVisibility({ checkOpacity: true, checkVisibilityCSS: true })
    || (img.complete && img.naturalWidth > 0))"""
CLASS_MAP_COLOURS = """() => { const c = document.getElementById('classmap');
    if (c.hidden || !c.width) return null;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const seen = new Set();
    for (let i = 0; i < d.length; i += 4) seen.add(`${d[i]},${d[i + 1]},${d[i + 2]}`);
    return [...seen]; }"""


def hex_rgb(colour: str) -> str:
    return ",".join(str(int(colour[i : i + 2], 16)) for i in (1, 3, 5))


@pytest.mark.parametrize("width", [1280, 400])
def test_the_page_fits_the_screen_and_never_shows_a_broken_image(
    browser, runs_server, serve_runs, tmp_path, width: int
) -> None:
    """Before any upload, with a segmentation drawn (the class map beside the image in pure
    class colours), and after a bad file (the error's text, no empty box)."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    try:
        page.goto(runs_server.url)
        page.wait_for_selector("#run-list button")
        assert page.evaluate(FITS) and page.evaluate(NO_BROKEN_IMAGE)
        assert page.is_hidden("#result") and page.is_hidden("#photo")
        page.screenshot(path=tmp_path / f"empty-{width}.png", full_page=True)

        choose(page, "segment")
        page.set_input_files("#file", image_of(serve_runs["segment_data"]))
        page.wait_for_selector("#fractions li")
        # (the tiny run may call every pixel one class: then no outline, only the map)
        wait_until(page, f"() => ({CLASS_MAP_COLOURS})() !== null")
        colours = page.evaluate("() => state.run.colours")
        palette = {"0,0,0"} | {hex_rgb(c) for c in colours if c}
        assert set(page.evaluate(CLASS_MAP_COLOURS)) <= palette  # solid colours, no blend
        assert page.evaluate(FITS) and page.evaluate(NO_BROKEN_IMAGE)
        stage = page.locator("#stage").bounding_box()
        assert stage["x"] + stage["width"] <= width
        page.screenshot(path=tmp_path / f"segment-{width}.png", full_page=True)

        page.set_input_files(
            "#file", files=[{"name": "bad.png", "mimeType": "image/png", "buffer": b"no png"}]
        )
        page.wait_for_selector("#error:not([hidden])")
        assert page.is_hidden("#result") and page.is_hidden("#stage")
        assert page.evaluate(FITS) and page.evaluate(NO_BROKEN_IMAGE)
        page.screenshot(path=tmp_path / f"error-{width}.png", full_page=True)
    finally:
        context.close()


def test_a_runs_first_use_says_the_model_is_loading(browser, runs_server, serve_runs, tmp_path):
    """Until a run has answered once (``warm`` false in GET /api/runs, made so here for
    every run), the status line says the model is loading while the request is out."""

    def cold(route) -> None:
        listed = route.fetch().json()
        for run in listed["runs"]:
            run["warm"] = False
        route.fulfill(json=listed)

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    held = []  # the page's request, sent on once the status has been read
    page.route("**/api/runs", cold)
    page.route("**/api/predict", lambda route: held.append(route))
    try:
        page.goto(runs_server.url)
        page.wait_for_selector("#run-list button")
        choose(page, "segment")
        page.set_input_files("#file", image_of(serve_runs["segment_data"]))
        wait_until(page, "() => document.getElementById('status').textContent.includes('load')")
        assert "loading the model" in page.inner_text("#status")
        page.screenshot(path=tmp_path / "first-use.png", full_page=True)
        held[0].continue_()
        page.wait_for_selector("#fractions li")
        assert "answered in" in page.inner_text("#status")
    finally:
        context.close()
