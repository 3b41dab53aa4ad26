"""The terminal daemon's configuration: one pydantic model, from YAML, with environment
overrides. Read once at the entry point (``tillflow edge run --config FILE``).

Overrides: ``TILLFLOW_<FIELD>``, nested fields joined by ``__``, values parsed as YAML
scalars — e.g. ``TILLFLOW_DEVICE_ID=T-0042``, ``TILLFLOW_RISK__FLOOR_LIMIT_MINOR=5000``.
Every option is documented in the README (a test checks each one appears there).

SIGHUP reloads the file. Each top-level option says what a reload does with it
(``reload`` in its field's ``json_schema_extra``; ``reload_mode``): a ``live`` option
takes effect at once; a ``restart`` option is read once, at start (it opens the
database, binds the socket, builds the drivers, configures logging or the scheduler), so
a changed value waits for the next start. ``on_reload`` puts the live ones in force and
keeps the running value of the others, so what the terminal reports (health) is what it
enforces; health lists the changes waiting in ``restart_pending``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge.errors import ConfigError

ENV_PREFIX = "TILLFLOW_"
#: Variables with the prefix that are not config overrides (read elsewhere).
_NOT_OVERRIDES = {
    "TILLFLOW_DATABASE_URL",
    "TILLFLOW_TEST_DATABASE_URL",
    "TILLFLOW_BENCH_DATABASE_URL",
}


#: ISO 4217 alphabetic codes of the money a customer can pay with (the standard's list one,
#: 2025), for ``currencies``. Left out on purpose: fund and accounting units (BOV, CHE, CHW,
#: CLF, COU, MXV, USN, UYI, UYW, XAD, XDR, XSU, XUA), precious metals (XAU, XAG, XPD, XPT),
#: bond-market units (XBA..XBD), the testing code XTS and "no currency" XXX, and currencies
#: withdrawn since (ANG, BGN, CUC, HRK, SLL, ZWL). A change to ISO 4217 is a change here.
_ISO_4217_CODES = """
    AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BRL BSD BTN BWP
    BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD
    FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD
    JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK
    MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR
    PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP
    SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES VND VUV WST XAF
    XCD XCG XOF XPF YER ZAR ZMW ZWG
"""
ISO_4217_CURRENCIES = frozenset(_ISO_4217_CODES.split())

#: What a terminal accepts unless configured otherwise: the currency of every example,
#: simulator and test here. A terminal elsewhere sets ``currencies``.
DEFAULT_CURRENCIES = ("EUR",)

ReloadMode = Literal["live", "restart"]
#: ``json_schema_extra`` of a top-level option: applied by SIGHUP at once.
LIVE: dict[str, Any] = {"reload": "live"}
#: ``json_schema_extra`` of a top-level option: read at start; a change waits for a restart.
RESTART: dict[str, Any] = {"reload": "restart"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RiskLimits(_Strict):
    """Offline approval limits; each decline names the limit it hit."""

    floor_limit_minor: int = Field(
        2_500, ge=0, description="largest single payment approved offline (minor units)"
    )
    offline_amount_cap_minor: int = Field(
        50_000, ge=0, description="total of unsent offline approvals allowed (minor units)"
    )
    offline_count_cap: int = Field(20, ge=0, description="number of unsent offline approvals")
    max_offline_age_s: int = Field(
        86_400, ge=0, description="past this age of the oldest unsent offline payment, no more"
    )
    velocity_window_s: int = Field(600, ge=1, description="window of the per-card velocity check")
    velocity_max: int = Field(3, ge=1, description="payments with one card within the window")
    online_random_percent: float = Field(
        5.0, ge=0, le=100, description="share of payments sent online when the link is up"
    )


#: Where the terminal's device service (or ``hwsim.devices``) listens by default.
DEFAULT_DEVICES_URL = "http://127.0.0.1:8791"


class CardReaderConfig(_Strict):
    url: str = Field(DEFAULT_DEVICES_URL, description="card reader endpoint (HTTP)")
    timeout_s: float = Field(30.0, gt=0, description="how long to wait for a card")


class PrinterConfig(_Strict):
    url: str = Field(DEFAULT_DEVICES_URL, description="receipt printer endpoint (HTTP)")


class LinkConfig(_Strict):
    url: str = Field(
        f"{DEFAULT_DEVICES_URL}/link", description="GET answering 2xx while the network is up"
    )


class AcquirerConfig(_Strict):
    url: str = Field("http://127.0.0.1:8790", description="acquirer host (HTTP+JSON)")
    timeout_s: float = Field(10.0, gt=0, description="per-request timeout")


class Peripherals(_Strict):
    card_reader: CardReaderConfig = CardReaderConfig()
    printer: PrinterConfig = PrinterConfig()
    acquirer: AcquirerConfig = AcquirerConfig()
    link: LinkConfig = LinkConfig()


class Schedule(_Strict):
    name: str = Field(description="trigger name (unique)")
    cron: str = Field(description="five-field cron expression in the terminal's local time")
    workflow: str = Field(description="workflow_type to start")
    input: dict[str, Any] = Field(default_factory=dict, description="run input")


class ConfigDocument(_Strict):
    """The content of a ``config`` document the control plane sends (``update_config``):
    ``{"risk": {...}}``. The risk limits it names override the config file's; those it
    leaves out keep the file's value (``with_document``). Validated whole before the
    command is recorded as applied: a bad field refuses the command, never half of it."""

    risk: dict[str, Any] = Field(
        default_factory=dict, description="risk limits to override (RiskLimits fields)"
    )

    @field_validator("risk")
    @classmethod
    def _risk_limits(cls, risk: dict[str, Any]) -> dict[str, Any]:
        RiskLimits.model_validate(risk)  # unknown names and bad values are errors
        return risk

    def with_document(self, risk: RiskLimits) -> RiskLimits:
        """``risk`` (the file's limits) with this document's overrides in force."""
        return RiskLimits.model_validate({**risk.model_dump(), **self.risk})


#: Bytes in a KiB, for the cloud batch default.
KIB = 1024


class CloudConfig(_Strict):
    """The control plane this terminal syncs with (``tillflow-edge enroll`` / ``run``)."""

    url: str = Field(
        min_length=1, description="control plane base URL, e.g. https://fleet.example.com"
    )
    enroll_token: str | None = Field(
        None, description="one-time enrollment token, used on the first start if not enrolled"
    )
    sync_interval_s: float = Field(30, gt=0, description="seconds between syncs when idle")
    batch_max_entries: int = Field(
        500, ge=1, le=2000, description="outbox entries (and audit rows) per sync request"
    )
    batch_max_bytes: int = Field(
        512 * KIB, ge=64 * KIB, description="bytes of entries per sync request, before gzip"
    )
    timeout_s: float = Field(10, gt=0, description="per-request timeout talking to the cloud")


class EdgeConfig(_Strict):
    device_id: str = Field(
        min_length=1, max_length=64, description="this terminal's id", json_schema_extra=RESTART
    )
    data_dir: Path = Field(
        Path("/var/lib/tillflow"), description="database, keys, policies", json_schema_extra=RESTART
    )
    socket_path: Path = Field(
        Path("/run/tillflow/edge.sock"),
        description="Unix socket of the local API for the POS app",
        json_schema_extra=RESTART,
    )
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite durability; FULL survives power loss", json_schema_extra=RESTART
    )
    db_budget_mb: float = Field(
        256,
        ge=0.25,
        description="database file budget (MiB); past it writes fail (storage_full)",
        json_schema_extra=RESTART,
    )
    storage_high_water_percent: int = Field(
        80,
        ge=10,
        le=99,
        description="above this share of the budget, offline sales are declined",
        json_schema_extra=LIVE,
    )
    retention_hours: float = Field(
        168,
        ge=1,
        description="finished runs and acknowledged audit rows older are compacted",
        json_schema_extra=LIVE,
    )
    wal_limit_mb: float = Field(
        4,
        ge=0.25,
        description="WAL size checkpoints cut back to; health warns above it",
        json_schema_extra=RESTART,
    )
    maintenance_interval_s: float = Field(
        300,
        ge=1,
        description="seconds between retention, vacuum and checkpoint passes",
        json_schema_extra=LIVE,
    )
    outbox_max_messages: int = Field(
        10_000,
        ge=1,
        description="unsent messages kept; past it, new payments are declined",
        json_schema_extra=RESTART,
    )
    outbox_max_mb: int = Field(
        16,
        ge=1,
        description="unsent message bytes kept (MiB); past it, payments are declined",
        json_schema_extra=RESTART,
    )
    currencies: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CURRENCIES),
        min_length=1,
        description="ISO 4217 codes accepted for payments and refunds; others: 422",
        json_schema_extra=LIVE,
    )
    policy_file: Path | None = Field(
        None, description="fraud policy to activate on start", json_schema_extra=LIVE
    )
    log_format: Literal["json", "text"] = Field(
        "text", description="json under systemd", json_schema_extra=RESTART
    )
    risk: RiskLimits = Field(RiskLimits(), json_schema_extra=LIVE)
    peripherals: Peripherals = Field(Peripherals(), json_schema_extra=RESTART)
    schedules: list[Schedule] = Field(
        default_factory=list, description="cron-like triggers", json_schema_extra=RESTART
    )
    cloud: CloudConfig | None = Field(
        None,
        description="the control plane to sync with; none: the terminal never syncs",
        json_schema_extra=RESTART,
    )

    @field_validator("currencies")
    @classmethod
    def _iso_4217(cls, codes: list[str]) -> list[str]:
        for code in codes:
            if code not in ISO_4217_CURRENCIES:
                raise ValueError(
                    f"{code!r} is not an ISO 4217 currency code a customer can pay in "
                    "(three capital letters, e.g. EUR, CHF, USD)"
                )
        if len(set(codes)) != len(codes):
            raise ValueError("a currency is listed twice")
        return codes

    @property
    def database_path(self) -> Path:
        return self.data_dir / "terminal.db"


def reload_mode(option: str) -> ReloadMode:
    """``live`` or ``restart``: what a SIGHUP does with ``option`` (a dotted name; a
    nested option goes with its top-level one, e.g. ``risk.floor_limit_minor``)."""
    field = EdgeConfig.model_fields[option.split(".")[0]]
    extra = field.json_schema_extra
    mode = extra.get("reload") if isinstance(extra, dict) else None
    if mode not in ("live", "restart"):
        raise ValueError(f"option {option!r} does not say what a reload does with it")
    return "live" if mode == "live" else "restart"


def on_reload(running: EdgeConfig, loaded: EdgeConfig) -> tuple[EdgeConfig, list[str]]:
    """The config a reload puts in force: ``loaded``'s live options and ``running``'s
    restart-only ones; with the restart-only options ``loaded`` changes (they wait for
    the next start)."""
    kept = {
        name: getattr(running, name)
        for name in EdgeConfig.model_fields
        if reload_mode(name) == "restart"
    }
    waiting = sorted(name for name, value in kept.items() if getattr(loaded, name) != value)
    return loaded.model_copy(update=kept), waiting


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> EdgeConfig:
    """Read ``path``, apply ``TILLFLOW_*`` overrides from ``environ``, validate. Errors name
    the file (or variable) and every bad field."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a YAML mapping")
    sources = {}
    for var, keys, value in _overrides(environ):
        _set(data, keys, value)
        sources[keys] = var
    try:
        return EdgeConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(str(x) for x in err["loc"])
            where = sources.get(loc, f"{p}")
            problems.append(f"{where}: {'.'.join(loc) or '(top)'}: {err['msg']}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems)) from exc


def _overrides(environ: Mapping[str, str] | None) -> Iterator[tuple[str, tuple[str, ...], Any]]:
    import os

    env = os.environ if environ is None else environ
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in _NOT_OVERRIDES:
            continue
        keys = tuple(k.lower() for k in var[len(ENV_PREFIX) :].split("__"))
        try:
            value = yaml.safe_load(env[var])
        except yaml.YAMLError:
            value = env[var]
        yield var, keys, value


def _set(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    cur = data
    for key in keys[:-1]:
        nxt = cur.get(key)
        if not isinstance(nxt, dict):
            nxt = cur[key] = {}
        cur = nxt
    cur[keys[-1]] = value


def options() -> list[tuple[str, str, str]]:
    """(dotted name, default, description) of every option, for docs and ``config check``."""
    out: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            # An optional section (``cloud: CloudConfig | None``) lists its options too.
            optional = get_origin(ann) in (Union, UnionType)
            models = [
                a
                for a in (get_args(ann) if optional else ())
                if isinstance(a, type) and issubclass(a, BaseModel)
            ]
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                models = [ann]
            if models:
                walk(models[0], f"{prefix}{name}.")
                continue
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = str(value) if isinstance(value, Path) else repr(value)
            out.append((f"{prefix}{name}", default, field.description or ""))

    walk(EdgeConfig, "")
    return out
