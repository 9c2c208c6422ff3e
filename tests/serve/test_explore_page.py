"""The explore page in a real browser (Playwright driving Debian's chromium, as the serve
page's tests): for ResNet-18 at 224 and the notes' ConvNet, a layer's formulas read from
the page are ``cnnlab summary --format json``'s for that row, and the receptive-field box of
a clicked feature-map pixel, read from the page, is where that unit's gradient with respect
to the input is nonzero. An unknown model is one line on the page. A classifier run's
Grad-CAM is drawn in colour over the image, with its scale. One browser, one server per
kind (``cnnlab explore`` of ResNet-18; the serve page's ``cnnlab serve`` of the tiny runs),
one page load per model."""

from __future__ import annotations

import re

import pytest

from cnnlab.inspect.specs import build_model, summarize_spec
from tests.conftest import ServerProcess
from tests.serve.conftest import CANVAS_COLOURS, watched_page
from tests.serve.test_explore import gradient_box


class ExploreServer(ServerProcess):
    COMMAND = "explore"
    ANNOUNCED = re.compile(r"^cnnlab explore: \S+ at (http://\S+/)explore\?model=\S+ ")


@pytest.fixture(scope="module")
def server():
    started = ExploreServer("resnet18", "--input", "3,224,224")
    yield started
    assert started.stop() == 0


def open_page(browser, server, query: str):
    """The explore page at 1280 px; its problems in ``page.problems``."""
    return watched_page(browser, server.url, f"explore{query}")


def select(page, index: int, blocks: list[str]) -> None:
    for block in blocks:  # open the blocks it is in (the page opens depth 1 only)
        head = page.locator(f'[data-block="{block}"]')
        if head.get_attribute("aria-expanded") == "false":
            head.click()
    page.click(f'[data-layer="{index}"]')
    page.wait_for_selector(f'#layer-title:has-text("{index}. ")')


def click_map_pixel(page, index: int, fraction: tuple[float, float]) -> tuple[list[int], list[int]]:
    """Click a pixel of the first feature map of layer ``index``: (the unit, the box on the
    input the page shows for it)."""
    thumbnail = page.locator(f'#maps[data-layer="{index}"] img').first
    thumbnail.wait_for()
    size = thumbnail.bounding_box()
    thumbnail.click(position={"x": size["width"] * fraction[0], "y": size["height"] * fraction[1]})
    shown = page.locator(f'#field-box[data-layer="{index}"]')
    shown.wait_for()
    unit = [int(v) for v in shown.get_attribute("data-unit").split(",")]
    return unit, [int(v) for v in shown.get_attribute("data-inside").split(",")]


# The width of a space over that of a digit in the font an element is drawn in: 1 in a
# monospace font, about a half in a text font.
SPACE_PER_DIGIT = """(selector) => {
    const style = getComputedStyle(document.querySelector(selector));
    const ctx = document.createElement('canvas').getContext('2d');
    ctx.font = `${style.fontSize} ${style.fontFamily}`;
    return ctx.measureText(' ').width / ctx.measureText('0').width; }"""


def test_resnet18_formulas_and_a_units_field(browser, server):
    page = open_page(browser, server, "?model=resnet18")
    page.wait_for_selector(".layer-row")
    # The document `cnnlab summary resnet18 --input 3,224,224 --format json` prints (a
    # subprocess would cost seconds of imports).
    rows = summarize_spec("resnet18", {}, (3, 224, 224))[1].to_dict("resnet18")["layers"]
    index = 4  # layer1.0.conv1
    select(page, index, ["layer1", "layer1.0"])
    assert page.text_content("#layer-size-formula") == rows[index]["size_formula"]
    assert page.text_content("#layer-param-formula") == rows[index]["formula"]
    assert page.text_content("#layer-param-formula") == "3*3*64*64 = 36,864"
    # layer1.0's + x is drawn: its marker in the column, an arc from the maxpool to it.
    assert "maxpool" in page.text_content('[data-join="0"]')
    assert page.locator("#joins path").count() >= 1
    page.click('[data-sample="china"]')
    (y, x), box = click_map_pixel(page, index, (0.5, 0.4))
    model, size = build_model("resnet18", {}, (3, 224, 224))
    assert box == gradient_box(model, size, rows[index]["name"], y, x)
    # The field's steps read as text: "1 + (7 - 1)*1 = 7", one space each, spaces narrower
    # than a digit (a monospace font makes them a digit wide: "(7  -  1)*1").
    steps = page.locator("#field-chain .formula").all_text_contents()
    assert steps[0] == "1 + (7 - 1)*1 = 7"
    assert page.evaluate(SPACE_PER_DIGIT, "#field-chain .formula") < 0.75
    assert page.evaluate(SPACE_PER_DIGIT, "#layer-size-formula") < 0.75
    assert not page.problems, page.problems
    page.close()


def test_convnet_formulas_a_padded_units_field_and_an_unknown_model(browser, server):
    page = open_page(browser, server, "?model=convnet")
    page.wait_for_selector(".layer-row")
    _, summary, size = summarize_spec("convnet", {}, None)
    rows = summary.to_dict("convnet")["layers"]
    index = 5  # features.conv2d_05, after a pool: a field of 8 with jump 2
    select(page, index, ["features"])
    assert page.text_content("#layer-size-formula") == rows[index]["size_formula"]
    assert page.text_content("#layer-param-formula") == rows[index]["formula"]
    page.click('[data-sample="digit"]')
    (y, x), box = click_map_pixel(page, index, (0.02, 0.02))  # the corner: partly padding
    assert (y, x) == (0, 0) and box == [0, 0, 4, 4]
    model, size = build_model("convnet", {}, None)
    assert box == gradient_box(model, size, rows[index]["name"], y, x)
    assert "padding" in page.text_content("#field-box")
    assert not page.problems, page.problems
    page.close()
    unknown = open_page(browser, server, "?model=resnet1800")
    unknown.wait_for_selector("#error:not([hidden])")
    assert "unknown model 'resnet1800'" in unknown.text_content("#error")
    assert "\n" not in unknown.text_content("#error").strip()
    unknown.close()


def test_a_classifier_runs_gradcam_is_drawn_in_colour_with_its_scale(browser, runs_server):
    """The explore page of the serve page's classifier run: its top classes for the digit
    sample, and the top class's Grad-CAM at the first layer over the image in the jet colour
    map (every pixel of the overlay coloured, none grey), with a scale saying what high is."""
    page = open_page(browser, runs_server, "?model=digits")
    page.wait_for_selector(".layer-row[aria-pressed=true]")
    page.click('[data-sample="digit"]')
    page.wait_for_selector("#classes button[aria-pressed=true]")
    page.wait_for_selector("#gradcam-legend:not([hidden])")
    top = page.get_attribute("#classes button[aria-pressed=true]", "data-class")
    assert f"Grad-CAM of {top}" in page.text_content("#input-caption")
    legend = page.text_content("#gradcam-what")
    assert legend.startswith("High (red, 1 = the map's peak)") and top in legend
    assert page.is_visible("#gradcam-legend .colourbar")
    pixels, drawn, coloured = page.evaluate(CANVAS_COLOURS, "input-overlay")
    assert pixels > 0 and drawn == pixels and coloured == drawn  # no unit picked: the map alone
    assert not page.problems, page.problems
    page.close()
