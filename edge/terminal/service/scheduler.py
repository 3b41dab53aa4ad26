"""Cron-like triggers on the device: ``schedules`` in the config start workflows (e.g. the
end-of-day settlement) at their times, with no Celery and no system cron.

Stdlib only (the frozen terminal binary stays small). The pieces:

* :class:`CronExpr` — a five-field cron expression (minute hour day-of-month month
  day-of-week) evaluated in a local time zone.
* :class:`Scheduler` — the daemon calls :meth:`Scheduler.on_start` once, then loops:
  sleep until :meth:`Scheduler.next_due`, call :meth:`Scheduler.tick`.
* :class:`SchedulerState` — where the last fired due time of each schedule is kept;
  :class:`FileSchedulerState` is a JSON file in the daemon's data dir.

Cron syntax
-----------
Each field is a comma-separated list of items; an item is ``*``, a value ``5``, a range
``1-5``, or a step over either, ``*/15`` or ``1-30/5`` (a step needs ``*`` or a range:
write ``5-59/15``, not ``5/15``). Months and weekdays also take three-letter English
names, in any case and also inside ranges (``jan-mar``, ``mon-fri``; ``fri-sun`` means
Friday to Sunday). Day-of-week ``0`` and ``7`` are both Sunday. A range must not run
backwards (``5-1`` is an error). ``@daily`` and the other macros are not supported.

Day-of-month and day-of-week combine as in Vixie cron (and cronie): when both fields are
restricted, a day matches if EITHER matches (``0 0 13 * fri`` runs on every 13th and on
every Friday); when either field starts with ``*`` (including ``*/2``) both must match.
A spec that can never match (``0 0 30 2 *``, ``0 0 31 4,6 *``) is rejected by
:meth:`CronExpr.parse`; ``29 2`` is accepted (leap years).

Local time and daylight saving time
-----------------------------------
An expression matches wall-clock minutes in the caller's zone (the ``tzinfo`` of the
datetime passed in; it must follow PEP 495, e.g. :class:`zoneinfo.ZoneInfo`). Each
matching wall-clock minute fires at most once:

* **Spring forward** (a wall time that does not exist, e.g. 02:30 in Europe/Berlin on
  the last Sunday of March): the trigger is NOT skipped; it fires at the first valid
  minute after the gap (03:00 CEST). Settlement that skipped a day would be worse than
  settlement half an hour late. Several matches inside one gap fire once, together.
* **Fall back** (a wall time that occurs twice, e.g. 02:30 on the last Sunday of
  October): it fires at the first occurrence only (02:30 CEST), not again an hour later.
  The repeated hour is not re-run for any expression, so ``*/15 * * * *`` has no
  triggers during the second pass of 02:00-02:59 (it resumes at 03:00 CET).

Firing, missed triggers and idempotency
---------------------------------------
A trigger starts ``start_run(workflow, input, idempotency_key)`` with the key
``schedule:<name>:<due time, ISO, minutes, with offset>``, e.g.
``schedule:end_of_day:2026-11-24T23:00+01:00``; ``Engine.start`` returns the existing
run for a repeated key, so a trigger fired twice (a crash between starting the run and
recording it, or two daemons) still makes ONE run. The due time is recorded in the state
only AFTER ``start_run`` returned.

Occurrences that passed while the daemon was down (or while one ``tick`` was late) are
coalesced: only the latest one fires, once. A schedule the state has never seen (a fresh
install, a newly added schedule, a deleted state file) does not fire occurrences from
before that first check: the latest due time strictly before now is recorded as the
baseline instead (installing a terminal at 23:30 must not settle at once for a 23:00 job
it was never running for). An occurrence due exactly at that first check's ``now`` does
fire.

If ``start_run`` raises, the error is logged, nothing is recorded and the schedule is
checked again after ``retry_s`` (with the same key, unless a later occurrence passed
meanwhile). If recording fails, the error is logged and the daemon carries on; after a
restart the trigger is re-fired with the same key, which the engine dedupes.

Not thread-safe: one loop owns a :class:`Scheduler`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as dtime
from pathlib import Path
from typing import Any, Protocol

from edge.engine.clock import Clock
from edge.errors import ConfigError, StoreError
from edge.terminal.config import Schedule
from edge.terminal.files import write_durably

__all__ = [
    "CronExpr",
    "FileSchedulerState",
    "MemorySchedulerState",
    "Scheduler",
    "SchedulerState",
    "idempotency_key",
]

log = logging.getLogger(__name__)

#: How far ``next_after`` / ``previous_at_or_before`` look before giving up. Nine years:
#: Feb 29 can be 8 years from the previous one (2096 -> 2104, 2100 is not a leap year).
HORIZON_DAYS = 9 * 366

_MINUTE = timedelta(minutes=1)
_DAY = timedelta(days=1)
_NUMBER = re.compile(r"[0-9]+")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_MAX_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int]


_FIELDS = (
    _Field("minute", 0, 59, {}),
    _Field("hour", 0, 23, {}),
    _Field("day-of-month", 1, 31, {}),
    _Field("month", 1, 12, {n: i + 1 for i, n in enumerate(_MONTHS)}),
    _Field("day-of-week", 0, 7, {n: i for i, n in enumerate(_WEEKDAYS)}),
)


@dataclass(frozen=True)
class CronExpr:
    """A parsed five-field cron expression; build with :meth:`parse`.

    The fields hold the sorted values that match (weekdays 0-6, Sunday 0). ``dom_star``
    and ``dow_star`` say whether the day fields started with ``*`` (Vixie's OR rule).
    """

    text: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]
    dom_star: bool
    dow_star: bool

    def __str__(self) -> str:
        return self.text

    @classmethod
    def parse(cls, text: str) -> CronExpr:
        """Parse ``text``; :class:`ConfigError` names the field and the bad token."""
        parts = text.split()
        if len(parts) != len(_FIELDS):
            raise ConfigError(
                f"cron {text!r}: expected 5 fields "
                f"(minute hour day-of-month month day-of-week), got {len(parts)}"
            )
        values = [_parse_field(text, f, part) for f, part in zip(_FIELDS, parts, strict=True)]
        weekdays = tuple(sorted({v % 7 for v in values[4]}))  # 7 is Sunday too
        expr = cls(
            text=" ".join(parts),
            minutes=values[0],
            hours=values[1],
            days=values[2],
            months=values[3],
            weekdays=weekdays,
            dom_star=parts[2].startswith("*"),
            dow_star=parts[4].startswith("*"),
        )
        # When only the day-of-month picks days, it must occur in one of the months.
        if (
            not expr.dom_star
            and expr.dow_star
            and not any(d <= _MAX_DAYS_IN_MONTH[m - 1] for m in expr.months for d in expr.days)
        ):
            raise ConfigError(
                f"cron {text!r}: day-of-month field: {parts[2]!r} never occurs in "
                f"month field {parts[3]!r}, so this schedule would never run"
            )
        return expr

    def matches_day(self, day: date) -> bool:
        """Whether ``day`` is a day this expression runs on (month and day fields)."""
        if day.month not in self.months:
            return False
        dom_ok = day.day in self.days
        dow_ok = day.isoweekday() % 7 in self.weekdays
        if self.dom_star or self.dow_star:
            return dom_ok and dow_ok
        return dom_ok or dow_ok

    def next_after(self, t: datetime) -> datetime:
        """The first trigger strictly after ``t``, in ``t``'s time zone (aware in, aware
        out). :class:`ConfigError` if there is none within :data:`HORIZON_DAYS`."""
        tz = _zone(t)
        limit = t.timestamp()
        start = t.replace(tzinfo=None, second=0, microsecond=0, fold=0) + _MINUTE
        for wall in self._walls(start, forward=True):
            instant = _instant(wall, tz)
            if instant.timestamp() > limit:
                return instant
        raise ConfigError(
            f"cron {self.text!r}: no matching time within {HORIZON_DAYS} days after {t.isoformat()}"
        )

    def previous_at_or_before(self, t: datetime) -> datetime | None:
        """The latest trigger at or before ``t``, in ``t``'s time zone; None if there is
        none within :data:`HORIZON_DAYS`."""
        tz = _zone(t)
        limit = t.timestamp()
        wall = t.replace(tzinfo=None, second=0, microsecond=0, fold=0)
        # In the second pass of a fall-back hour the wall clock reads earlier than minutes
        # that already happened (the first pass): start the backward walk that much later.
        offset_now = t.utcoffset() or timedelta(0)
        offset_before = datetime.fromtimestamp(limit - 86_400, tz).utcoffset() or timedelta(0)
        start = wall + max(timedelta(0), offset_before - offset_now)
        for candidate in self._walls(start, forward=False):
            instant = _instant(candidate, tz)
            if instant.timestamp() <= limit:
                return instant
        return None

    def _walls(self, start: datetime, *, forward: bool) -> Iterator[datetime]:
        """Matching naive wall-clock minutes from ``start`` (inclusive), in order."""
        step = _DAY if forward else -_DAY
        hours = self.hours if forward else self.hours[::-1]
        minutes = self.minutes if forward else self.minutes[::-1]
        day = start.date()
        for i in range(HORIZON_DAYS):
            if i:
                try:
                    day += step
                except OverflowError:
                    return
            if not self.matches_day(day):
                continue
            for h in hours:
                if i == 0 and _passed(h, start.hour, forward):
                    continue
                for m in minutes:
                    if i == 0 and h == start.hour and _passed(m, start.minute, forward):
                        continue
                    yield datetime.combine(day, dtime(h, m))


def _passed(value: int, start: int, forward: bool) -> bool:
    """Whether ``value`` lies before ``start`` in the walk's direction."""
    return value < start if forward else value > start


def _parse_field(text: str, field: _Field, part: str) -> tuple[int, ...]:
    def bad(token: str, why: str) -> ConfigError:
        return ConfigError(f"cron {text!r}: {field.name} field: {token!r} {why}")

    def value(token: str, *, range_end: bool = False) -> int:
        if _NUMBER.fullmatch(token):
            n = int(token)
            if not field.low <= n <= field.high:
                raise bad(token, f"is out of range {field.low}-{field.high}")
            return n
        name = token.lower()
        if name in field.names:
            n = field.names[name]
            # "fri-sun": Sunday as the end of a weekday range is 7.
            return 7 if range_end and field.name == "day-of-week" and n == 0 else n
        if field.names:
            names = ", ".join(field.names)
            raise bad(token, f"is not a number {field.low}-{field.high} or one of {names}")
        raise bad(token, f"is not a number {field.low}-{field.high}")

    out: set[int] = set()
    for item in part.split(","):
        if not item:
            raise bad(part, "has an empty list item")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not _NUMBER.fullmatch(step_text) or int(step_text) == 0:
                raise bad(item, f"has a bad step {step_text!r} (a whole number >= 1)")
            step = int(step_text)
        if base == "*":
            low, high = field.low, field.high
        elif "-" in base:
            first, _, last = base.partition("-")
            if not first or not last:
                raise bad(item, "is not a range (write 'first-last')")
            low, high = value(first), value(last, range_end=True)
            if low > high:
                raise bad(item, f"is a backwards range ({low} > {high})")
        else:
            if slash:
                raise bad(item, f"has a step without a range (write '{base}-{field.high}/{step}')")
            low = high = value(base)
        out.update(range(low, high + 1, step))
    return tuple(sorted(out))


def _zone(t: datetime) -> tzinfo:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"a timezone-aware datetime is required, got {t!r}")
    return t.tzinfo


def _instant(wall: datetime, tz: tzinfo) -> datetime:
    """The instant a naive wall-clock minute fires at in ``tz``: itself (the first of two
    if the clocks fall back), or, if the clocks skip it, the first valid minute after."""
    for _ in range(2 * 24 * 60):  # no zone skips more than a day
        aware = wall.replace(tzinfo=tz)  # fold=0: the first occurrence of an ambiguous time
        back = aware.astimezone(UTC).astimezone(tz)
        if back.replace(tzinfo=None) == wall:
            return back
        wall += _MINUTE
    raise ConfigError(f"time zone {tz}: no valid wall-clock time within two days of {wall}")


def idempotency_key(name: str, due: datetime) -> str:
    """The run's idempotency key for schedule ``name`` due at ``due`` (aware)."""
    return f"schedule:{name}:{due.isoformat(timespec='minutes')}"


class SchedulerState(Protocol):
    """The last due time fired (or baselined) per schedule, in epoch seconds."""

    def last_fired(self, name: str) -> float | None: ...

    def record_fired(self, name: str, due_ts: float) -> None: ...


class MemorySchedulerState:
    """A :class:`SchedulerState` that forgets on exit (tests, the hardware simulator)."""

    def __init__(self, initial: dict[str, float] | None = None) -> None:
        self._data = dict(initial or {})

    def last_fired(self, name: str) -> float | None:
        return self._data.get(name)

    def record_fired(self, name: str, due_ts: float) -> None:
        self._data[name] = float(due_ts)


class FileSchedulerState:
    """A :class:`SchedulerState` in a JSON file, read once on open and rewritten whole on
    every record (temp file, fsync, ``os.replace``, directory fsync), so after a crash
    or power cut the file is the old or the new version, never a torn one.

    One writer per file: two processes sharing it may lose each other's updates, which
    only means a trigger is fired again with the same idempotency key (one run).
    A file that is not valid state raises :class:`ConfigError` naming it; deleting it
    re-baselines every schedule (triggers missed in the current downtime do not run).
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._data = self._load()

    def last_fired(self, name: str) -> float | None:
        return self._data.get(name)

    def record_fired(self, name: str, due_ts: float) -> None:
        if not math.isfinite(due_ts):
            raise ValueError(f"due_ts must be finite, got {due_ts!r}")
        data = {**self._data, name: float(due_ts)}
        doc = {"version": self.VERSION, "last_fired": dict(sorted(data.items()))}
        self._write((json.dumps(doc, indent=2) + "\n").encode("utf-8"))
        self._data = data

    def _load(self) -> dict[str, float]:
        hint = "delete it to start over (schedules are re-baselined; missed triggers are lost)"
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(
                f"{self.path}: cannot read scheduler state: {exc.strerror or exc}"
            ) from exc
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(
                f"{self.path}: scheduler state is corrupt (not JSON: {exc})", hint=hint
            ) from exc
        entries = doc.get("last_fired") if isinstance(doc, dict) else None
        if (
            not isinstance(doc, dict)
            or doc.get("version") != self.VERSION
            or not isinstance(entries, dict)
        ):
            raise ConfigError(
                f"{self.path}: scheduler state is corrupt (expected an object with "
                f'"version": {self.VERSION} and a "last_fired" object)',
                hint=hint,
            )
        out: dict[str, float] = {}
        for name, ts in entries.items():
            if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
                raise ConfigError(
                    f"{self.path}: scheduler state is corrupt "
                    f"(last_fired[{name!r}] is {ts!r}, not a time)",
                    hint=hint,
                )
            out[name] = float(ts)
        return out

    def _write(self, data: bytes) -> None:
        try:
            write_durably(self.path, data)
        except OSError as exc:
            raise StoreError(
                f"cannot write scheduler state {self.path}: {exc.strerror or exc}",
                operation="write",
                path=str(self.path),
                hint="check the data directory's permissions and free space",
                retryable=True,
            ) from exc


@dataclass
class _Entry:
    schedule: Schedule
    expr: CronExpr
    last: float | None = None
    next_check: float = math.inf


StartRun = Callable[[str, dict[str, Any], str], object]


class Scheduler:
    """Fires ``schedules`` through ``start_run(workflow, input, idempotency_key)``.

    Wire it to the engine with
    ``lambda wf, inp, key: engine.start(wf, inp, idempotency_key=key)``.
    Call :meth:`on_start` once before :meth:`tick` and :meth:`next_due`.
    """

    def __init__(
        self,
        schedules: Sequence[Schedule],
        start_run: StartRun,
        clock: Clock,
        *,
        tz: tzinfo,
        state: SchedulerState,
        retry_s: float = 60.0,
    ) -> None:
        if not isinstance(tz, tzinfo):
            raise TypeError(f"tz must be a tzinfo, got {tz!r}")
        if not retry_s > 0:
            raise ValueError(f"retry_s must be > 0, got {retry_s!r}")
        self._entries: list[_Entry] = []
        seen: set[str] = set()
        for s in schedules:
            if s.name in seen:
                raise ConfigError(f"schedules: the name {s.name!r} is used twice")
            seen.add(s.name)
            try:
                expr = CronExpr.parse(s.cron)
            except ConfigError as exc:
                raise ConfigError(f"schedules: {s.name!r}: {exc.message}", hint=exc.hint) from exc
            self._entries.append(_Entry(s, expr))
        self._start_run = start_run
        self._clock = clock
        self._tz = tz
        self._state = state
        self._retry_s = retry_s
        self._started = False

    def on_start(self) -> list[str]:
        """Load each schedule's last fired time; fire, once, every schedule whose latest
        due time <= now is later than that (missed during downtime). A schedule never
        seen before is baselined instead (see the module doc). Returns the names fired."""
        now = self._clock.now()
        now_dt = datetime.fromtimestamp(now, self._tz)
        fired: list[str] = []
        for e in self._entries:
            e.last = self._state.last_fired(e.schedule.name)
            if e.last is None:
                base = e.expr.previous_at_or_before(now_dt - timedelta(microseconds=1))
                if base is not None:
                    e.last = base.timestamp()
                    self._record(e, base)
            if self._check(e, now, now_dt):
                fired.append(e.schedule.name)
        self._started = True
        return fired

    def tick(self) -> list[str]:
        """Fire every schedule whose next due time <= now (several passed occurrences of
        one schedule fire once). Returns the names fired."""
        self._require_started()
        now = self._clock.now()
        now_dt = datetime.fromtimestamp(now, self._tz)
        return [
            e.schedule.name
            for e in self._entries
            if e.next_check <= now and self._check(e, now, now_dt)
        ]

    def next_due(self) -> float | None:
        """Epoch seconds of the soonest next check (a trigger or a retry); None if there
        are no schedules. The daemon sleeps until then and calls :meth:`tick`."""
        self._require_started()
        return min((e.next_check for e in self._entries), default=None)

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("Scheduler.on_start() must be called first")

    def _check(self, e: _Entry, now: float, now_dt: datetime) -> bool:
        """Fire ``e`` for its latest due time <= now if not fired yet; set its next check."""
        natural_next = e.expr.next_after(now_dt).timestamp()
        due = e.expr.previous_at_or_before(now_dt)
        if due is None or (e.last is not None and due.timestamp() <= e.last):
            e.next_check = natural_next
            return False
        s = e.schedule
        key = idempotency_key(s.name, due)
        try:
            self._start_run(s.workflow, copy.deepcopy(s.input), key)
        except Exception:
            log.exception(
                "scheduled run could not be started; retrying in %ss",
                self._retry_s,
                extra={"action": "schedule_failed", "schedule": s.name, "idempotency_key": key},
            )
            e.next_check = min(now + self._retry_s, natural_next)
            return False
        log.info(
            "scheduled run started",
            extra={
                "action": "schedule_fired",
                "schedule": s.name,
                "workflow": s.workflow,
                "idempotency_key": key,
            },
        )
        e.last = due.timestamp()
        e.next_check = natural_next
        self._record(e, due)
        return True

    def _record(self, e: _Entry, due: datetime) -> None:
        try:
            self._state.record_fired(e.schedule.name, due.timestamp())
        except Exception:
            # The run exists (or this is a baseline); after a restart the same key is
            # fired again and the engine returns the existing run.
            log.exception(
                "could not record a scheduled trigger",
                extra={"action": "schedule_record_failed", "schedule": e.schedule.name},
            )
