"""How a browser opens cnnlab's pages outside a person's hands: Debian's chromium, headless
and offline (no background requests of its own, no updates, no sync), driven by Playwright.
The page tests (tests/serve/conftest.py), the docs' screenshots (docs/screenshots.py) and
the explore page's benchmark (benchmarks/explore.py) all launch it so.

It lives in the package, not beside one of them, because all three can import cnnlab and
none can import the others (benchmarks and docs are not packages; tests are not installed).
Constants only: the package itself never needs Playwright or a browser."""

from __future__ import annotations

CHROMIUM = "/usr/bin/chromium"  # Debian's package; never Playwright's own download
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_launch(executable: str = CHROMIUM) -> dict[str, object]:
    """The keyword arguments of Playwright's ``chromium.launch`` for ``executable``."""
    return {"executable_path": executable, "args": list(CHROMIUM_ARGS)}
