"""``tillflow fleet rollouts ...``: rollouts over the Fleet API (registered by
``cloud.opcli``, whose client, tables and exit statuses these share).

Commands::

    start config|policy|release [FILE] [flags]   start one (201: its run has started)
    list [--kind K] [--status S]                 newest first
    show ID                                      per wave: targeted, notified, applied,
                                                 healthy, failed, refused, timed out,
                                                 pending; threshold and current rate;
                                                 why it aborted; the rollback's progress;
                                                 a release's bytes sent (total, mean, max)
    devices ID [--wave N] [--status S]           each device's status and timestamps (a
                                                 release: the bytes it downloaded)
    pause|resume|approve|abort|retry-failed ID [--reason WHY]
    watch ID [--interval S]                      show again every 2 s until it ends
                                                 (exit 0 succeeded, 1 rolled back/failed)

``start``'s FILE (YAML or JSON, ``-``: stdin) is the request as the API takes it
(``target``, ``waves``, ``abort``, ``gates``, ``windows``, ..., and ``content``,
``version`` or ``release``); every flag given sets its field over the file's
(``--content FILE`` the new document's content, ``--target-*``/``--device``/``--all``
the whole target). Without FILE, the flags are the request.

Only the standard library at import (``cloud.opcli``'s rule): httpx and yaml when a
command runs. ``render(view)`` and ``progress(view)`` (the view of ``GET
/api/v1/rollouts/{id}`` as text) need nothing registered: a demo or a test may call them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import ModuleType

#: ``cloud.opcli``, handed over by its ``register`` (``add_commands``): its client's
#: errors, tables and paging, shared; not imported here, so the two modules make no
#: import cycle (``cloud.opcli`` imports this one).
cli: Any = None

Data = Any
Column = tuple[str, Callable[[dict[str, Any]], Any]]
#: ``cloud.opcli.Api`` (the client: ``call``, ``items``).
Api = Any
Action = Callable[[Api, argparse.Namespace], tuple[Data, str, int]]

KINDS = ("config", "policy", "release")
STATUSES = (
    "pending", "running", "paused", "awaiting_approval", "succeeded", "aborting",
    "rolled_back", "failed",
)  # fmt: skip
#: A rollout in one of these has ended: ``watch`` stops.
ENDED = ("succeeded", "rolled_back", "failed")
DEVICE_STATUSES = (
    "planned", "held", "notified", "applied", "healthy", "failed", "refused", "timed_out",
    "cancelled",
)  # fmt: skip
FAILURE_KINDS = ("failed", "refused", "timed_out")
CONTROLS = ("pause", "resume", "approve", "abort", "retry-failed")
#: Seconds between two looks of ``watch``.
WATCH_INTERVAL_S = 2.0
#: A TTY's screen cleared and the cursor home, before ``watch`` draws again.
CLEAR = "\x1b[H\x1b[2J"

Group = Callable[[str, str], "argparse._SubParsersAction[argparse.ArgumentParser]"]
Leaf = Callable[..., argparse.ArgumentParser]


# --- cells and tables (as cloud.opcli's; here so render and progress need nothing else) ---


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _col(header: str, key: str | None = None, *, time: bool = False) -> Column:
    name = key or header
    return header, (lambda r: _when(r.get(name))) if time else (lambda r: _cell(r.get(name)))


def _table(rows: list[dict[str, Any]], columns: list[Column], empty: str) -> str:
    if not rows:
        return empty
    cells = [[h for h, _ in columns]] + [[str(f(r)) for _, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


# --- the request from a file and flags ---------------------------------------------------------


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: one or more values, comma-separated")
    return items


def _waves(text: str) -> list[str]:
    return _csv(text)


def _wave_numbers(text: str) -> list[int]:
    out = []
    for item in _csv(text):
        if not item.isdigit() or int(item) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: wave numbers (1,2), each >= 1")
        out.append(int(item))
    return out


def _kinds(text: str) -> list[str]:
    items = _csv(text)
    bad = [i for i in items if i not in FAILURE_KINDS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"{bad[0]!r}: failure kinds are {', '.join(FAILURE_KINDS)}"
        )
    return items


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        value = -1.0
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (0-100)")
    return value


def request_body(a: argparse.Namespace) -> dict[str, Any]:
    """The POST body: FILE's mapping, then each flag given over it."""
    body: dict[str, Any] = {}
    if a.file is not None:
        loaded = cli.load_document(a.file)
        if not isinstance(loaded, dict):
            raise cli.FleetError(f"{a.file} must hold a mapping, not {type(loaded).__name__}")
        body.update(loaded)
    if a.content is not None:
        content = cli.load_document(a.content)
        if not isinstance(content, dict):
            raise cli.FleetError(f"{a.content} must hold a mapping, not {type(content).__name__}")
        body["content"] = content
    if a.version is not None:
        body["version"] = a.version
    if a.release is not None:
        body["release"] = a.release
    target: dict[str, Any] = {}
    for field, values in (
        ("groups", a.target_group), ("stores", a.target_store), ("tags", a.target_tag),
        ("binary_versions", a.target_binary_version), ("device_ids", a.device),
    ):  # fmt: skip
        if values:
            target[field] = list(values)
    if a.all:
        if target:
            raise cli.FleetError("--all takes no other --target-* or --device")
        target = {"all": True}
    if target:
        body["target"] = target
    for field in ("waves", "seed", "soak_s", "device_timeout_s", "rate_per_minute"):
        value = getattr(a, field)
        if value is not None:
            body[field] = value
    abort = dict(body.get("abort") or {})
    for field in ("failure_percent", "min_sample_wave", "min_sample_total", "count"):
        value = getattr(a, field)
        if value is not None:
            abort[field] = value
    if abort:
        body["abort"] = abort
    if a.approve_after is not None:
        body["gates"] = {**(body.get("gates") or {}), "approve_after": a.approve_after}
    if a.reason is not None:
        body["reason"] = a.reason
    if "target" not in body:
        raise cli.FleetError(
            "no target: give --all, --target-group/--target-store/--target-tag/"
            "--target-binary-version/--device, or a FILE with target"
        )
    if a.kind == "release" and "release" not in body:
        raise cli.FleetError("a release rollout names the release: --release NAME")
    if a.kind != "release" and "content" not in body and "version" not in body:
        raise cli.FleetError(f"a {a.kind} rollout needs --content FILE or --version N")
    return body


# --- showing ------------------------------------------------------------------------------------


def _document(doc: dict[str, Any] | None) -> str:
    """What is rolled out: ``config version 3``, ``release 1.4.0``; a version its run has
    not made yet reads ``config (version not made yet)``."""
    if not doc:
        return "-"
    if doc.get("release"):
        return f"release {doc['release']}"
    if doc.get("version") is None:
        return f"{doc.get('kind', '?')} (version not made yet)"
    return f"{doc.get('kind', '?')} version {doc['version']}"


def _version(doc: dict[str, Any] | None) -> str:
    """The list's column: the release, or the version (``-`` until the run makes it)."""
    if not doc:
        return "-"
    return str(doc.get("release") or _cell(doc.get("version")))


def _pct(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}%"


def _threshold(t: dict[str, Any] | None) -> str:
    if not t:
        return "-"
    counted = ", ".join(t.get("count") or FAILURE_KINDS)
    return (
        f"abort past {_pct(t.get('failure_percent'))} {counted} "
        f"(sampled at least {_cell(t.get('min_sample_wave'))} in a wave, "
        f"{_cell(t.get('min_sample_total'))} overall)"
    )


def _rate(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    return (
        f"{_cell(r.get('failures'))} failed of {_cell(r.get('sampled'))} sampled "
        f"({_pct(r.get('failure_percent'))})"
    )


def _abort(ab: dict[str, Any] | None) -> str | None:
    if not ab:
        return None
    figures = ab.get("figures") or {}
    text = f"aborted: {ab.get('criterion', '?')}"
    if ab.get("wave") is not None:
        text += f" in wave {ab['wave']}"
    if figures:
        text += (
            f": {_cell(figures.get('failures'))} failed of "
            f"{_cell(figures.get('sampled'))} sampled ({_pct(figures.get('failure_percent'))}, "
            f"threshold {_pct(figures.get('threshold'))})"
        )
    text += f" at {_when(ab.get('at'))}"
    if ab.get("by") and ab.get("criterion") == "operator":  # else the run's own verdict
        text += f" by {ab['by']}"
    if ab.get("reason"):
        text += f": {ab['reason']}"
    return text


def _rollback(rb: dict[str, Any] | None) -> str | None:
    if not rb:
        return None
    return (
        f"rollback {rb.get('status', '?')}: {_cell(rb.get('to_restore'))} to restore, "
        f"{_cell(rb.get('restored'))} restored, {_cell(rb.get('failed'))} failed, "
        f"{_cell(rb.get('timed_out'))} timed out, {_cell(rb.get('pending'))} pending"
    )


def _size(n: Any) -> str:
    return "-" if n is None else f"{int(n) / 1e6:.1f} MB ({int(n):,} bytes)"


def _downloads(d: dict[str, Any] | None) -> str | None:
    """A release rollout's bytes sent, as the devices reported downloading them."""
    if not d:
        return None
    text = (
        f"bytes sent: {_cell(d.get('devices'))} device(s) reported, {_size(d.get('total'))} "
        f"in all, mean {_size(d.get('mean'))}, max {_size(d.get('max'))}"
    )
    if d.get("restore_devices"):
        text += (
            f"; restores: {_cell(d.get('restore_devices'))} device(s), "
            f"{_size(d.get('restore_total'))}"
        )
    return text


def wave_cols() -> list[Column]:
    return [
        _col("wave"), _col("size"), _col("targeted"), _col("notified"),
        _col("applied"), _col("healthy"), _col("failed"), _col("refused"),
        _col("timed out", "timed_out"), _col("pending"), _col("status"),
        _col("started", "started_at", time=True), _col("finished", "finished_at", time=True),
    ]  # fmt: skip


def render(view: dict[str, Any]) -> str:
    """One rollout for a person: what, where it is, the waves as a table, the threshold
    and the current rate, why it aborted and how far the rollback has got."""
    opts = view.get("options") or {}
    controls = view.get("controls") or {}
    gates = (opts.get("gates") or {}).get("approve_after") or []
    waves = view.get("waves") or []
    lines = [
        f"rollout {view.get('rollout_id')}: {_document(view.get('document'))} -- "
        f"{view.get('status')}",
        f"created {_when(view.get('created_at'))} by {_cell(view.get('created_by'))}; "
        f"updated {_when(view.get('updated_at'))}; finished {_when(view.get('finished_at'))}",
        f"run {_cell(view.get('run_id'))} ({_cell(view.get('run_status'))}); "
        f"seed {_cell(view.get('seed'))}",
        f"waves {_cell(opts.get('waves'))}; at wave {_cell(view.get('current_wave'))} of "
        f"{len(waves)}; soak {_cell(opts.get('soak_s'))}s; device timeout "
        f"{_cell(opts.get('device_timeout_s'))}s; rate "
        + (f"{opts['rate_per_minute']}/min" if opts.get("rate_per_minute") else "unlimited")
        + f"; approval after wave(s) {_cell(gates)}",
        f"threshold: {_threshold(view.get('threshold'))}",
        f"current rate: {_rate(view.get('rate'))}",
        f"controls: paused {_cell(bool(controls.get('paused')))}, approved through wave "
        f"{_cell(controls.get('approved_through'))}, abort requested "
        f"{_cell(bool(controls.get('abort_requested')))}",
        "",
        _table(waves, wave_cols(), "no waves planned yet (the run plans them)"),
    ]
    extras = (
        _downloads(view.get("bytes_downloaded")),
        _abort(view.get("abort")),
        _rollback(view.get("rollback")),
    )
    for extra in extras:
        if extra:
            lines.append(extra)
    return "\n".join(lines)


def progress(view: dict[str, Any]) -> str:
    """One line: the status and the devices' counts over every wave."""
    waves = view.get("waves") or []

    def total(name: str) -> int:
        return sum(int(w.get(name) or 0) for w in waves)

    counts = ", ".join(
        f"{total(n)} {n.replace('_', ' ')}"
        for n in ("notified", "applied", "healthy", "failed", "refused", "timed_out", "pending")
    )
    line = (
        f"{view.get('rollout_id')} {view.get('status')}: wave {_cell(view.get('current_wave'))}"
        f"/{len(waves)}, {total('targeted')} targeted: {counts}"
    )
    rb = _rollback(view.get("rollback"))
    return line + (f"; {rb}" if rb else "")


def list_cols() -> list[Column]:
    return [
        _col("id", "rollout_id"), _col("kind"), _col("status"),
        ("version", lambda r: _version(r.get("document"))), _col("wave", "current_wave"),
        _col("targeted"), _col("created", "created_at", time=True),
        _col("by", "created_by"), _col("finished", "finished_at", time=True),
    ]  # fmt: skip


def device_cols() -> list[Column]:
    return [
        _col("device", "device_id"), _col("store"), _col("group"), _col("wave"),
        _col("status"), _col("notified", "notified_at", time=True),
        _col("applied", "applied_at", time=True), _col("healthy", "healthy_at", time=True),
        _col("failed", "failed_at", time=True), _col("restore", "restore_status"),
        _col("restored", "restored_at", time=True), _col("bytes", "bytes_downloaded"),
        _col("last error", "last_error"),
    ]  # fmt: skip


# --- the commands -----------------------------------------------------------------------------


def _listing(data: dict[str, Any], columns: list[Column], empty: str) -> tuple[Data, str, int]:
    shown: tuple[Data, str, int] = cli.listing(data, columns, empty)
    return shown


def rollouts_start(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("POST", f"/{a.kind}/rollout", body=request_body(a))
    text = (
        f"rollout {out['rollout_id']} started ({out.get('kind')}, {out.get('status')}); "
        f"follow it: tillflow fleet rollouts watch {out['rollout_id']}"
    )
    return out, text, cli.EXIT_OK


def rollouts_list(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    data = cli.pages(api, a, "/rollouts", {"kind": a.kind, "status": a.status})
    return _listing(data, list_cols(), "no rollouts")


def rollouts_show(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("GET", f"/rollouts/{cli._seg(a.id)}")
    return out, render(out), cli.EXIT_OK


def rollouts_devices(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    data = cli.pages(
        api, a, f"/rollouts/{cli._seg(a.id)}/devices", {"wave": a.wave, "status": a.status}
    )
    return _listing(data, device_cols(), f"rollout {a.id}: no devices (planned by its run)")


def _control(action: str) -> Action:
    def steer(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
        out = api.call("POST", f"/rollouts/{cli._seg(a.id)}/{action}", body={"reason": a.reason})
        return out, f"rollout {a.id}: {action} recorded; now {out.get('status')}", cli.EXIT_OK

    return steer


def rollouts_watch(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    """Show the rollout again every ``--interval`` seconds until it ends: on a TTY the
    whole view redrawn, else one progress line each time it changes."""
    tty = sys.stdout.isatty() and not a.json
    last = None
    while True:
        out = api.call("GET", f"/rollouts/{cli._seg(a.id)}")
        ended = out.get("status") in ENDED
        if ended:
            code = cli.EXIT_OK if out["status"] == "succeeded" else cli.EXIT_ERROR
            return out, (CLEAR if tty else "") + render(out), code
        if not a.json:
            if tty:
                print(CLEAR + render(out), flush=True)
            else:
                line = progress(out)
                if line != last:
                    print(line, flush=True)
                last = line
        try:
            time.sleep(a.interval)
        except KeyboardInterrupt:
            return out, render(out), 130


# --- the parser ------------------------------------------------------------------------------


def add_commands(opcli: ModuleType, group: Group, leaf: Leaf) -> None:
    """The ``rollouts`` group and its commands (``opcli``: ``cloud.opcli`` itself;
    ``group``/``leaf``: its register's makers of a group and a command)."""
    global cli
    cli = opcli
    g = group("rollouts", "config, policy and release rollouts in waves")

    c = leaf(g, "start", rollouts_start, "start a rollout (its run starts at once)")
    c.add_argument("kind", choices=KINDS)
    c.add_argument(
        "file", nargs="?", metavar="FILE",
        help="the request (YAML/JSON: target, waves, abort, ..., content|version|release); "
        "flags given override it (-: stdin)",
    )  # fmt: skip
    what = c.add_argument_group("what is rolled out")
    what.add_argument("--content", metavar="FILE", help="(config, policy) the new document")
    what.add_argument("--version", type=cli._positive, help="(config, policy) an existing version")
    what.add_argument("--release", metavar="NAME", help="(release) the uploaded release's name")
    to = c.add_argument_group("target (AND across kinds, OR within one; repeatable)")
    to.add_argument("--target-group", action="append", metavar="GROUP")
    to.add_argument("--target-store", action="append", metavar="STORE")
    to.add_argument("--target-tag", action="append", metavar="TAG")
    to.add_argument("--target-binary-version", action="append", metavar="VERSION")
    to.add_argument("--device", action="append", metavar="DEVICE", help="an explicit device")
    to.add_argument("--all", action="store_true", help="every active device")
    how = c.add_argument_group("how it goes")
    how.add_argument(
        "--waves", type=_waves, metavar="LIST",
        help="cumulative sizes, counts or percentages (1%%,10%%,50%%,100%%; default "
        "10%%,50%%,100%%)",
    )  # fmt: skip
    how.add_argument("--seed", type=int, help="wave membership seed (default: drawn, recorded)")
    how.add_argument("--soak-s", type=_seconds, metavar="S",
                     help="seconds healthy after applying to succeed (300)")  # fmt: skip
    how.add_argument("--failure-percent", type=_percent, metavar="P",
                     help="abort past this failure rate (10)")  # fmt: skip
    how.add_argument("--min-sample-wave", type=cli._positive, metavar="N",
                     help="outcomes in a wave before its rate counts (5)")  # fmt: skip
    how.add_argument("--min-sample-total", type=cli._positive, metavar="N",
                     help="outcomes overall before the overall rate counts (10)")  # fmt: skip
    how.add_argument("--count", type=_kinds, metavar="KINDS",
                     help="failure kinds that count: failed,refused,timed_out (all)")  # fmt: skip
    how.add_argument("--device-timeout-s", type=_seconds, metavar="S",
                     help="a device silent this long is timed out (3600)")  # fmt: skip
    how.add_argument("--approve-after", type=_wave_numbers, metavar="WAVES",
                     help="pause for approval after these waves (1,2)")  # fmt: skip
    how.add_argument("--rate-per-minute", type=cli._positive, metavar="N",
                     help="devices notified per minute (unlimited)")  # fmt: skip
    c.add_argument("--reason", help="why (kept in the audit log)")

    c = leaf(g, "list", rollouts_list, "rollouts, newest first", paged=True)
    c.add_argument("--kind", choices=KINDS)
    c.add_argument("--status", choices=STATUSES)
    leaf(
        g, "show", rollouts_show,
        "one rollout: its waves, the threshold and current rate, abort and rollback",
    ).add_argument("id", metavar="ID")  # fmt: skip
    c = leaf(g, "devices", rollouts_devices, "a rollout's devices and their status", paged=True)
    c.add_argument("id", metavar="ID")
    c.add_argument("--wave", type=cli._positive, metavar="N")
    c.add_argument("--status", choices=DEVICE_STATUSES)
    helps = {
        "pause": "notify no more devices until resumed",
        "resume": "go on after a pause",
        "approve": "let the next wave start (after an --approve-after gate)",
        "abort": "stop and roll back: every device that took it is restored",
        "retry-failed": "notify the failed and timed-out devices again",
    }
    for action in CONTROLS:
        c = leaf(g, action, _control(action), helps[action])
        c.add_argument("id", metavar="ID")
        c.add_argument("--reason", help="why (kept in the audit log)")
    c = leaf(
        g, "watch", rollouts_watch,
        "show a rollout again until it ends (exit 0 succeeded, 1 rolled back or failed)",
    )  # fmt: skip
    c.add_argument("id", metavar="ID")
    c.add_argument("--interval", type=_seconds, default=WATCH_INTERVAL_S, metavar="S",
                   help=f"seconds between two looks ({WATCH_INTERVAL_S:g})")  # fmt: skip


__all__ = ["add_commands", "progress", "render", "request_body"]
