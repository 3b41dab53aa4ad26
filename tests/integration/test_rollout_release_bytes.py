"""A release rollout reports the bytes sent per device (issue 17): each device's
``release_result`` (what the terminal's installer reports, ``bytes_downloaded``) for the
rollout's command and for its restore, shown by ``GET /api/v1/rollouts/{id}/devices``,
summed up (devices, total, mean, max, restores) by ``GET /api/v1/rollouts/{id}``, and
printed by ``tillflow fleet rollouts show`` and ``devices``.

The Fleet API runs in process on a PostgreSQL database of its own; the terminals sync
their results over ``/v1/sync`` as a device does (``sync_memory.Terminal``). No worker
runs: the commands the rollout's run would have queued are written into its devices'
rows (what ``Broadcast_To_Fleet`` records), so the view is read over known results. A
result that is not a byte count (the payload is the device's) counts as none, never a
5xx."""

from __future__ import annotations

import time
from typing import Any

from sync_memory import outbox_entry
from test_fleet_rollouts_api import CONFIG, fleet, ok  # noqa: F401 (fleet: the fixture)

from cloud.opcli_rollouts import device_cols, render

TOPIC = "release_result"


def result(seq: int, command_id: str, downloaded: Any) -> dict[str, Any]:
    payload = {"command_id": command_id, "release": "1.1.0", "status": "installed",
               "reason": None, "bytes_downloaded": downloaded, "from_release": "1.0.0"}  # fmt: skip
    return outbox_entry(seq, payload=payload, topic=TOPIC)


def test_release_rollout__bytes_sent_per_device_and_in_all(fleet):  # noqa: F811
    terms = [fleet.enroll("store-1") for _ in range(5)]
    for term in terms:
        ok(fleet.sync(term, config_version=None, storage_state="ok"))
    fleet.sql(
        "INSERT INTO releases (release, manifest_sha256, sums, signature, files, bytes, "
        "new_bytes, uploaded_at, uploaded_by) VALUES (%s, %s, '', %s, 3, 1000, 1000, %s, 't')",
        ("1.1.0", "ab" * 32, b"\x00" * 64, time.time()),
    )
    body = {"release": "1.1.0", "target": {"all": True}, "waves": ["100%"]}
    rid = ok(fleet.post("/api/v1/release/rollout", "operator", json=body), 201)["rollout_id"]
    before = ok(fleet.get(f"/api/v1/rollouts/{rid}", "read_only"))["bytes_downloaded"]
    assert before == {"devices": 0, "total": 0, "mean": None, "max": None,
                      "restore_devices": 0, "restore_total": 0}  # fmt: skip

    # The commands its run queued: one per device; the first was restored after too.
    a, b, c, d, e = (t.device_id for t in terms)
    for n, device in enumerate((a, b, c, d, e)):
        fleet.sql(
            "UPDATE rollout_devices SET command_id = %s, status = 'notified' "
            "WHERE rollout_id = %s AND device_id = %s",
            (f"cmd-{n}", rid, device),
        )
    fleet.sql(
        "UPDATE rollout_devices SET restore_command_id = 'restore-0' "
        "WHERE rollout_id = %s AND device_id = %s",
        (rid, a),
    )
    ok(fleet.sync(terms[0], outbox=[result(1, "cmd-0", 2_900_000), result(2, "restore-0", 0)]))
    ok(fleet.sync(terms[1], outbox=[result(1, "cmd-1", 3_100_000)]))
    # Not counted: a result of another command, and results that are no byte count.
    ok(fleet.sync(terms[2], outbox=[result(1, "cmd-other", 9_999_999), result(2, "cmd-2", "lots")]))
    ok(fleet.sync(terms[3], outbox=[result(1, "cmd-3", -5)]))
    # e reported nothing yet.

    view = ok(fleet.get(f"/api/v1/rollouts/{rid}", "read_only"))
    assert view["bytes_downloaded"] == {
        "devices": 2, "total": 6_000_000, "mean": 3_000_000, "max": 3_100_000,
        "restore_devices": 1, "restore_total": 0,
    }  # fmt: skip
    page = ok(fleet.get(f"/api/v1/rollouts/{rid}/devices", "read_only"))["items"]
    got = {i["device_id"]: (i["bytes_downloaded"], i["restore_bytes_downloaded"]) for i in page}
    assert got == {a: (2_900_000, 0), b: (3_100_000, None), c: (None, None), d: (None, None),
                   e: (None, None)}  # fmt: skip
    # A page holds its own devices' figures.
    first = ok(fleet.get(f"/api/v1/rollouts/{rid}/devices?limit=1", "read_only"))["items"]
    assert [(i["device_id"], i["bytes_downloaded"]) for i in first] == [
        (min(got), got[min(got)][0])
    ]

    # What `tillflow fleet rollouts show` and `devices` print of it.
    text = render(view)
    assert (
        "bytes sent: 2 device(s) reported, 6.0 MB (6,000,000 bytes) in all, mean 3.0 MB "
        "(3,000,000 bytes), max 3.1 MB (3,100,000 bytes); restores: 1 device(s), 0.0 MB "
        "(0 bytes)"
    ) in text, text
    columns = dict(device_cols())
    assert [columns["bytes"](i) for i in page if i["device_id"] in (a, c)] == [
        "2900000" if a < c else "-",
        "-" if a < c else "2900000",
    ]


def test_config_rollout__shows_no_bytes(fleet):  # noqa: F811
    term = fleet.enroll("store-1")
    ok(fleet.sync(term, config_version=None, storage_state="ok"))
    body = {"content": CONFIG, "target": {"all": True}}
    rid = ok(fleet.post("/api/v1/config/rollout", "operator", json=body), 201)["rollout_id"]
    view = ok(fleet.get(f"/api/v1/rollouts/{rid}", "read_only"))
    assert view["bytes_downloaded"] is None
    assert "bytes sent" not in render(view)
    (item,) = ok(fleet.get(f"/api/v1/rollouts/{rid}/devices", "read_only"))["items"]
    assert (item["bytes_downloaded"], item["restore_bytes_downloaded"]) == (None, None)
