"""What the browser tests of both pages share: Debian's chromium driven by Playwright (one
browser per module), a page that collects its own problems, and one ``cnnlab serve`` of the
tiny runs of each task.

Without chromium the browser tests skip with the command that installs it, except under CI
(``CI=true``), where a missing browser is a failure."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cnnlab.serve.chromium import CHROMIUM, chromium_launch
from tests.conftest import ServerProcess


def chromium_path() -> str:
    """Debian's chromium (the one the screenshots and the benchmark launch), else the
    chromium on PATH."""
    for found in (CHROMIUM, shutil.which("chromium")):
        if found and os.access(found, os.X_OK):
            return found
    message = "no chromium for the browser tests: apt-get install -y chromium"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Chromium, headless, offline (no background requests of its own). Per module, not per
    session: Playwright's sync API keeps an event loop that other modules' asyncio must
    not meet."""
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(**chromium_launch(executable))
        yield launched
        launched.close()


def watched_page(browser, server_url: str, path: str = "", width: int = 1280):
    """A page at ``server_url + path``, in a context of its own (closing the page closes it),
    ``width`` x 900 CSS pixels; its problems (script errors, console errors, requests that
    leave the server) are collected in ``page.problems``."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None
    )
    page.on(
        "request",
        lambda r: (
            None
            if r.url.startswith((server_url, "data:", "blob:"))
            else problems.append(f"request elsewhere: {r.url}")
        ),
    )
    page.problems = problems
    page.goto(server_url + path)
    return page


# A canvas's (pixels, those drawn (alpha > 0), those coloured (R, G, B not all equal: a grey
# picture has none)); null while the canvas is missing or has no size yet.
CANVAS_COLOURS = """(id) => { const c = document.getElementById(id);
    if (!c || !c.width) return null;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let drawn = 0, coloured = 0;
    for (let i = 0; i < d.length; i += 4) {
        if (d[i + 3] === 0) continue;
        drawn += 1;
        if (d[i] !== d[i + 1] || d[i + 1] !== d[i + 2]) coloured += 1;
    }
    return [c.width * c.height, drawn, coloured]; }"""


@pytest.fixture(scope="session")
def runs_server(
    serve_runs: dict[str, Path], launch_server: Callable[..., ServerProcess]
) -> ServerProcess:
    """``cnnlab serve`` of the classify, segment and detect runs (the serve page's tests,
    and the explore page of a classifier run)."""
    return launch_server(*(serve_runs[task] for task in ("classify", "segment", "detect")))
