"""Screenshots of the operator dashboard, and how long each page took to draw, in a real
browser: Playwright driving Debian's Chromium (``/usr/bin/chromium``; no browser is
ever downloaded).

``capture(base_url, token, out_dir, rollout_ids=(), device_id=None)`` logs in at
``/ui/login`` with the API token (as an operator would), then opens the Fleet page, the
Rollouts list, each rollout given, one device (``device_id``, else the first the Fleet
page lists) and the Audit page (for a role with audit), saving a full-page PNG of each
in ``out_dir``. It returns ``[{"page", "path", "load_ms", "url"}]``: ``load_ms`` is the
navigation's start until the page's content is drawn (its ``main`` visible, the load
event fired: every server-rendered table and SVG is in by then). The fleet simulator
calls it at the end of a run to put the pictures and the times in its report.

hwsim reaches the cloud only over HTTP: this imports neither ``cloud`` nor a database
driver.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

#: Debian's Chromium (``apt-get install chromium``).
CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1440, "height": 900}
#: Bound on one page's navigation (ms).
NAV_TIMEOUT_MS = 30_000


class ScreenshotError(RuntimeError):
    """The dashboard did not show what was asked (the login was refused, a page failed)."""


def _shot(page: Any, base_url: str, path: str, name: str, out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    answer = page.goto(base_url + path, wait_until="load", timeout=NAV_TIMEOUT_MS)
    page.locator("main").wait_for(state="visible", timeout=NAV_TIMEOUT_MS)
    load_ms = (time.perf_counter() - started) * 1000.0
    if answer is None or answer.status >= 400:
        status = None if answer is None else answer.status
        raise ScreenshotError(f"{path}: answered {status}")
    if page.url.split("?")[0].endswith("/ui/login") and not path.startswith("/ui/login"):
        raise ScreenshotError(f"{path}: sent to the login page (the session is not live)")
    target = out_dir / f"{name}.png"
    page.screenshot(path=str(target), full_page=True)
    return {"page": name, "path": str(target), "load_ms": round(load_ms, 1), "url": path}


def login(page: Any, base_url: str, token: str) -> None:
    """Log in with ``token`` through the login form; raises if it is refused."""
    page.goto(base_url + "/ui/login", wait_until="load", timeout=NAV_TIMEOUT_MS)
    page.fill("#token", token)
    with page.expect_navigation(timeout=NAV_TIMEOUT_MS):
        page.click("button[type=submit]")
    if page.url.split("?")[0].endswith("/ui/login"):
        error = page.locator("#login-error")
        why = error.inner_text() if error.count() else "refused"
        raise ScreenshotError(f"the dashboard refused the token: {why}")


def capture(
    base_url: str,
    token: str,
    out_dir: Path,
    rollout_ids: Sequence[str] = (),
    device_id: str | None = None,
) -> list[dict[str, Any]]:
    """A PNG and the draw time of each dashboard page (the module docstring)."""
    from playwright.sync_api import sync_playwright

    base_url = base_url.rstrip("/")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shots: list[dict[str, Any]] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
            page = context.new_page()
            login(page, base_url, token)
            shots.append(_shot(page, base_url, "/ui/fleet", "fleet", out_dir))
            if device_id is None:
                first = page.locator("#device-table a[href^='/ui/devices/']").first
                if first.count():
                    device_id = first.inner_text().strip()
            shots.append(_shot(page, base_url, "/ui/rollouts", "rollouts", out_dir))
            for rollout_id in rollout_ids:
                path = f"/ui/rollouts/{quote(rollout_id, safe='')}"
                shots.append(_shot(page, base_url, path, f"rollout-{rollout_id}", out_dir))
            if device_id:
                path = f"/ui/devices/{quote(device_id, safe='')}"
                shots.append(_shot(page, base_url, path, "device", out_dir))
            if page.locator("header nav a[href='/ui/audit']").count():
                shots.append(_shot(page, base_url, "/ui/audit?verify=cloud", "audit", out_dir))
        finally:
            browser.close()
    return shots


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshots of the Tillflow dashboard")
    parser.add_argument("--url", required=True, help="the control plane, http://HOST:PORT")
    parser.add_argument("--token", required=True, help="an API token to log in with")
    parser.add_argument("--out", required=True, type=Path, help="directory for the PNGs")
    parser.add_argument("--rollout", action="append", default=[], help="a rollout id (repeat)")
    parser.add_argument("--device", default=None, help="the device to show")
    args = parser.parse_args(argv)
    shots = capture(args.url, args.token, args.out, args.rollout, args.device)
    print(json.dumps(shots, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["CHROMIUM", "ScreenshotError", "capture", "login"]
