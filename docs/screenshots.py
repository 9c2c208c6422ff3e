"""The page screenshots of docs/, taken again after the pages change:

- ``explore.png`` (1280 px wide, the whole page) and ``explore_400.png`` (400 px, a phone):
  ``cnnlab explore resnet18 --input 3,224,224``, layer1.0.conv1 selected, the ``china``
  sample, a unit of its first feature map clicked;
- ``serve.png`` (1200 px wide, the whole page): ``cnnlab serve`` of the demo's ConvNet
  (``make demo``'s ``runs/demo``) given ``docs/digits_page.png``, class 5's heat map chosen
  and shown at opacity 0.8.

Playwright drives Debian's chromium, offline, launched as the page tests do
(``cnnlab.serve.chromium``). Each page must fit its width (no horizontal scroll) and say
nothing in its console.

    python docs/screenshots.py [--demo runs/demo] [--out docs]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from cnnlab.serve.chromium import chromium_launch

DOCS = Path(__file__).resolve().parent
ANNOUNCED = re.compile(r"^cnnlab (?:serve|explore): .* at (http://\S+/)")
FITS = "() => document.documentElement.scrollWidth <= window.innerWidth"
# every image shown has loaded (the figures in a closed <details> are lazy: never loaded)
LOADED = "() => [...document.images].every((i) => !i.checkVisibility() || i.complete)"


def start(*args: str) -> tuple[subprocess.Popen, str]:
    """``cnnlab ARGS --port 0`` in a child process, and the address it announced."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", *args, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    for line in process.stderr:
        if found := ANNOUNCED.match(line):
            # read on, so that its log never fills the pipe and stops it
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, found.group(1)
    raise SystemExit(f"cnnlab {' '.join(args)} did not start")


def wait_until(page: Page, predicate: str, timeout: float = 60.0) -> None:
    """Poll ``predicate`` (the pages' Content-Security-Policy refuses wait_for_function)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate):
        if time.monotonic() > deadline:
            raise SystemExit(f"still false after {timeout:.0f} s: {predicate}")
        time.sleep(0.1)


def checked(page: Page, problems: list[str], out: Path, **screenshot: object) -> None:
    if not page.evaluate(FITS):
        raise SystemExit(f"{out.name}: the page is wider than the screen")
    if problems:
        raise SystemExit(f"{out.name}: {problems}")
    page.screenshot(path=out, **screenshot)
    print(f"wrote {out}")


def new_page(browser, width: int, height: int) -> tuple[Page, list[str]]:
    page = browser.new_page(viewport={"width": width, "height": height})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    return page, problems


def explore_shots(browser, url: str, out: Path) -> None:
    for width, name in ((1280, "explore.png"), (400, "explore_400.png")):
        page, problems = new_page(browser, width, 900)
        page.goto(f"{url}explore?model=resnet18")
        page.wait_for_selector(".layer-row")
        for block in ("layer1", "layer1.0"):
            head = page.locator(f'[data-block="{block}"]')
            if head.get_attribute("aria-expanded") == "false":
                head.click()
        page.click('[data-layer="4"]')  # layer1.0.conv1
        page.wait_for_selector('#layer-title:has-text("4. ")')
        page.click('[data-sample="china"]')
        thumbnail = page.locator('#maps[data-layer="4"] img').first
        thumbnail.wait_for()
        size = thumbnail.bounding_box()
        thumbnail.click(position={"x": size["width"] * 0.45, "y": size["height"] * 0.42})
        page.wait_for_selector('#field-box[data-layer="4"]')
        wait_until(page, LOADED)
        checked(page, problems, out / name, full_page=True)
        page.close()


def serve_shot(browser, url: str, out: Path) -> None:
    page, problems = new_page(browser, 1200, 760)
    page.goto(url)
    page.wait_for_selector("#run-list button")
    page.set_input_files("#file", DOCS / "digits_page.png")
    page.wait_for_selector("#top input[value='5']")
    page.check("#top input[value='5']")
    wait_until(page, "() => document.getElementById('peak').textContent.startsWith('P(5)')")
    page.eval_on_selector(  # the map's colours readable at the picture's size
        "input[aria-label='heat map opacity']",
        "s => { s.value = '0.8'; s.dispatchEvent(new Event('input')); }",
    )
    wait_until(page, LOADED)
    checked(page, problems, out / "serve.png", full_page=True)
    print(page.inner_text("#top1"), "|", page.inner_text("#peak"))
    page.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo's run")
    parser.add_argument("--out", type=Path, default=DOCS, help="where the PNGs go")
    args = parser.parse_args()
    servers = [start("explore", "resnet18", "--input", "3,224,224")]
    if args.demo.is_dir():
        servers.append(start("serve", str(args.demo)))
    else:
        print(f"no {args.demo} (make demo writes it): serve.png not taken")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(**chromium_launch())
            explore_shots(browser, servers[0][1], args.out)
            if len(servers) > 1:
                serve_shot(browser, servers[1][1], args.out)
            browser.close()
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
