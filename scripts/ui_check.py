"""Open a sweep's MLflow UI URL in the system's headless Chromium and check what a researcher sees.

    python scripts/ui_check.py URL --expect 5ec95_00000 --expect val/robust_acc/worst_case --screenshot ui.png

Playwright drives Debian's ``chromium`` (``/usr/bin/chromium``, or $GCE_CHROMIUM); no browser is downloaded.
Exit status 1 names what was not on screen. ``tests/test_ui_browser.py`` runs it after a real sweep.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CHROMIUM = os.environ.get("GCE_CHROMIUM", "/usr/bin/chromium")


def check_ui(url: str, expect: list[str], *, screenshot: str | Path | None = None, click: list[str] = (),
             width: int = 1800, height: int = 950, timeout_s: float = 90.0) -> tuple[list[str], str]:
    """Load ``url``, wait until every ``expect`` text is on the page (or the timeout), optionally click the
    tabs named in ``click`` first and save a screenshot. Returns (the texts missing, the page's text)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url, wait_until="domcontentloaded", timeout=timeout_s * 1000)
            _close_assistant(page)
            for name in click:
                page.get_by_role("tab", name=name).first.click(timeout=timeout_s * 1000)
            missing = list(expect)
            deadline = timeout_s * 1000
            for text in expect:
                try:
                    page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=deadline)
                    missing.remove(text)
                except PlaywrightTimeout:
                    deadline = 2000  # the page has loaded by now: the rest is either there or not
            page.wait_for_timeout(1500)  # let charts and columns settle before the picture
            if screenshot:
                page.screenshot(path=str(screenshot))
            return missing, page.inner_text("body")
        finally:
            browser.close()


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an "MLflow Assistant" side panel on a first visit; it hides half the runs table."""
    try:
        panel = page.get_by_text("MLflow Assistant").first
        panel.wait_for(state="visible", timeout=8000)
        page.locator("button[aria-label='Close']").last.click(timeout=3000)
    except Exception:  # no panel in this MLflow version, or already closed
        return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--expect", action="append", default=[], help="text that must be on screen (repeatable)")
    parser.add_argument("--click", action="append", default=[], help="a tab to open first (repeatable)")
    parser.add_argument("--screenshot")
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args(argv)
    missing, _ = check_ui(args.url, args.expect, screenshot=args.screenshot, click=args.click,
                          timeout_s=args.timeout)
    if missing:
        print(f"not on screen: {missing}", file=sys.stderr)
        return 1
    print(f"on screen: {args.expect}" + (f"; screenshot {args.screenshot}" if args.screenshot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
