"""The dashboard in a real browser: Playwright driving Debian's Chromium against the real
control plane (``tillflow cloud serve`` and a ``tillflow cloud worker``, ``hwsim.cloudrig``,
on this test's own PostgreSQL database and Redis database number) and simulated
terminals (``hwsim.simfleet``: the real runtime and sync client) syncing all along in a
thread of this process.

One rig for the whole story, told as an operator would live it (each step asserts what
the page shows, found by the ids the templates give):

1. log in with an operator's token; the Fleet page counts every terminal;
2. a config rollout (two waves, an approval gate after the first) started through the
   Fleet API: its page's funnel moves without a reload (the 2 s fetch), Pause and Resume
   take effect, Approve opens wave 2, it succeeds;
3. a config that jams one hardware model's printer: the rollout aborts on the failure
   rate, the page says why (criterion and figures) and follows the rollback to done;
4. a read-only user sees no control, and its POST (and the API's) is refused;
5. a tampered row in the cloud's audit log and one in a device's chain: the Audit page
   shows each first broken link;
6. ``hwsim.screenshots.capture`` saves a PNG of each page with its draw time.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hwsim.cloudrig import CloudRig, FleetApi
from hwsim.screenshots import CHROMIUM, capture
from hwsim.simfleet import FleetSpec, HardwareModel, SimFleet

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
playwright_api = pytest.importorskip("playwright.sync_api")

if not Path(CHROMIUM).exists():  # make test installs it (the Makefile's chromium-binary)
    pytest.skip(f"no {CHROMIUM}: apt-get install chromium", allow_module_level=True)

N = 10
#: Its printer jams under a config raising the offline floor limit past 5,000.
JAMS = HardwareModel(
    "XR-7", weight=1,
    fails_config=lambda c: int(c.get("risk", {}).get("floor_limit_minor", 0)) > 5_000,
)  # fmt: skip
PLAIN = HardwareModel("TF-100", weight=1)
#: Bound on any one wait for the page to show a state (a rollout's poll is 10 s).
STATE_MS = 120_000


@pytest.fixture
def fleet(rig: CloudRig, api: FleetApi, tmp_path: Path) -> Iterator[SimFleet]:
    """N terminals (half of them the jamming model), enrolled and settled, then syncing
    in a thread (about once a second each) until the test ends."""
    spec = FleetSpec(terminals=N, seed=11, stores=2, models=(PLAIN, JAMS), sync_interval_s=0.7)
    made = SimFleet(spec, tmp_path / "fleet", rig.url)
    stop = threading.Event()
    runner = threading.Thread(target=lambda: made.run(900, until=stop.is_set, check_s=0.2))
    try:
        tokens = [
            api.post("/api/v1/enroll-tokens", {"store": t.spec.store, "group": t.spec.group})[
                "token"
            ]
            for t in made.terminals
        ]
        made.enroll_all(tokens)
        made.settle()
        runner.start()
        yield made
    finally:
        stop.set()
        if runner.is_alive():
            runner.join(timeout=60)
        made.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            launched.close()


def _token(api: FleetApi, role: str) -> str:
    return str(api.post("/api/v1/api-tokens", {"name": f"{role}-ui", "role": role})["token"])


def _login(browser: Any, url: str, token: str) -> Any:
    page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
    page.set_default_timeout(30_000)
    page.goto(url + "/ui/fleet")
    assert "/ui/login" in page.url  # deny by default: no cookie, no page
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui/fleet$"))
    return page


def _status(page: Any, status: str) -> None:
    playwright_api.expect(page.locator("#rollout-status")).to_have_text(status, timeout=STATE_MS)


def _click(page: Any, action: str) -> None:
    with page.expect_navigation():
        page.click(f"button[data-action={action}]")


def _rollout(api: FleetApi, floor: int, **options: Any) -> str:
    body = {"content": {"risk": {"floor_limit_minor": floor}}, "target": {"all": True}, **options}
    return str(api.post("/api/v1/config/rollout", body)["rollout_id"])


def test_dashboard_in_chromium__fleet_rollout_controls_abort_audit_and_read_only(
    rig: CloudRig, api: FleetApi, fleet: SimFleet, browser: Any, tmp_path: Path
) -> None:
    expect = playwright_api.expect
    operator = _token(api, "operator")
    page = _login(browser, rig.url, operator)

    # 1. the fleet: every terminal, none needing attention
    expect(page.locator("#active-count")).to_have_text(str(N))
    assert page.locator("#device-table tbody tr").count() == N
    expect(page.locator(".user")).to_contain_text("operator")

    # 2. a healthy rollout: the funnel moves live; pause, resume, approve; it succeeds
    good = _rollout(api, 3000, waves=["50%", "100%"], soak_s=1, gates={"approve_after": [1]})
    page.goto(f"{rig.url}/ui/rollouts/{good}")
    loaded_url = page.url
    _click(page, "pause")
    _status(page, "paused")
    expect(page.locator("#notice")).to_contain_text("Pause")
    assert page.locator("button[data-action=pause]").count() == 0
    _click(page, "resume")
    page.wait_for_selector("#rollout-status")
    loaded_url = page.url
    healthy = page.locator("#funnel g.wave[data-wave='1'] rect[data-stage=healthy]")
    expect(healthy).not_to_have_attribute("data-count", "0", timeout=STATE_MS)  # live, no reload
    assert page.url == loaded_url and page.locator("#live[data-updated]").count() == 1
    _status(page, "awaiting approval")
    _click(page, "approve")
    _status(page, "succeeded")
    expect(page.locator("#wave-table tr[data-wave='2'] td[data-healthy]")).not_to_have_text("0")
    assert page.locator("#controls button[data-action=pause]").count() == 0
    history = page.locator("#history").inner_text()
    assert "pause" in history and "resume" in history and "approve" in history

    # 3. a config that jams XR-7's printer: aborted on the failure rate, rolled back
    bad = _rollout(
        api, 6000, waves=["100%"], soak_s=60, device_timeout_s=120,
        abort={"failure_percent": 20, "min_sample_wave": 2, "min_sample_total": 2},
    )  # fmt: skip
    page.goto(f"{rig.url}/ui/rollouts/{bad}")
    expect(page.locator("#abort-criterion")).to_have_text(
        re.compile(r"(wave|total) failure rate"), timeout=STATE_MS
    )
    expect(page.locator("#abort")).to_contain_text("above the threshold of 20")
    expect(page.locator("#rollback-status")).to_have_text("done", timeout=STATE_MS)
    _status(page, "rolled back")
    restored = int(page.locator("#rollback-restored").inner_text())
    assert restored >= len(fleet.by_model("XR-7")) > 0
    page.goto(f"{rig.url}/ui/rollouts?status=rolled_back")
    expect(page.locator("#rollout-table")).to_contain_text(bad)

    # 4. read only: no controls, the POST refused by the dashboard and by the API
    reader = _login(browser, rig.url, _token(api, "read_only"))
    live = _rollout(api, 3000, waves=["100%"], soak_s=600)
    reader.goto(f"{rig.url}/ui/rollouts/{live}")
    expect(reader.locator("#read-only-note")).to_be_visible()
    assert reader.locator("#controls button").count() == 0
    csrf = reader.locator("input[name=csrf]").first.get_attribute("value")
    refused = reader.request.post(
        f"{rig.url}/ui/rollouts/{live}/abort", form={"csrf": csrf or ""}, max_redirects=0
    )
    assert refused.status == 403 and "may not do this" in refused.text()
    assert reader.locator("header nav a[href='/ui/audit']").count() == 0
    with rig.fleet(token=_token(api, "read_only")) as ro_api:
        assert ro_api.call("POST", f"/api/v1/rollouts/{live}/abort").status_code == 403
    page.goto(f"{rig.url}/ui/rollouts/{live}")
    _click(page, "abort")  # the operator may: recorded
    expect(page.locator("#live")).to_contain_text("abort", timeout=STATE_MS)

    # 5. tampered rows: the Audit page shows each chain's first broken link
    device = fleet.by_model("TF-100")[0].device_id
    assert device is not None
    with psycopg.connect(rig.database_url, autocommit=True) as conn:
        conn.execute("UPDATE cloud_audit SET detail = '{\"edited\": true}' WHERE seq = 3")
        seq = conn.execute(
            "SELECT min(seq) + 1 FROM device_audit WHERE device_id = %s", (device,)
        ).fetchone()[0]
        conn.execute(
            "UPDATE device_audit SET detail = '{\"edited\": true}' "
            "WHERE device_id = %s AND seq = %s", (device, seq),
        )  # fmt: skip
    page.goto(f"{rig.url}/ui/audit")
    page.click("#verify-cloud")
    expect(page.locator("#cloud-verdict")).to_contain_text("Broken")
    expect(page.locator("#cloud-first-bad")).to_have_text("3")
    assert page.locator("#cloud-around tr.row-bad").count() == 1
    page.fill("input[name=device]", device)
    page.click("#verify-device-button")
    expect(page.locator("#device-verdict")).to_contain_text("Broken")
    expect(page.locator(".device-first-bad").first).to_have_text(str(seq))
    page.goto(f"{rig.url}/ui/devices/{device}")
    expect(page.locator("#timeline")).to_contain_text("update_config")
    expect(page.locator("#versions")).to_be_visible()

    # 6. screenshots of each page, with their draw times (a Playwright of its own: in
    # another thread, as this thread's is running)
    with ThreadPoolExecutor(1) as other:
        shots = other.submit(capture, rig.url, operator, tmp_path / "shots", [good, bad], device)
        shots = shots.result(timeout=300)
    names = [s["page"] for s in shots]
    assert names == ["fleet", "rollouts", f"rollout-{good}", f"rollout-{bad}", "device", "audit"]
    for shot in shots:
        assert Path(shot["path"]).stat().st_size > 5_000 and shot["load_ms"] > 0
