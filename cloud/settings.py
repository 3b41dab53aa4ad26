"""The control plane's one settings model, read by ``tillflow cloud serve`` and
``tillflow cloud worker`` alike (DESIGN.md: one settings model per process).

Where a value comes from, last wins: the defaults below, the YAML file
(``--config FILE``, else ``$TILLFLOW_CLOUD_CONFIG``), the environment
(``TILLFLOW_<FIELD>``, e.g. ``TILLFLOW_DATABASE_URL``, ``TILLFLOW_BROKER_URL``), then the
command's own flags. An error names the file or the variable and the field.

``database_url`` and ``broker_url`` left unset mean "embedded": the processes start (or
find) a PostgreSQL of their own and use a broker that needs no server
(``cloud.embedded``); the README's ``make demo`` runs that way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.errors import ConfigError

#: The environment variable naming the settings file.
CONFIG_ENV = "TILLFLOW_CLOUD_CONFIG"
ENV_PREFIX = "TILLFLOW_"


class CloudSettings(BaseModel):
    """Every option of the control plane's processes (the README lists them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    database_url: str | None = Field(
        None,
        description="PostgreSQL (postgresql://USER@HOST:PORT/DB); unset: an embedded one",
    )
    broker_url: str | None = Field(
        None,
        description="Celery broker (redis://HOST:PORT/N); unset: a serverless broker",
    )
    signing_key_file: Path = Field(
        Path("~/.tillflow/control-plane.key"),
        description="the command-signing key (Ed25519, made on first start, mode 0600)",
    )
    data_dir: Path = Field(
        Path("~/.tillflow/cloud"),
        description="where the embedded PostgreSQL and serverless broker keep their files",
    )
    host: str = Field("127.0.0.1", description="the API's listen address")
    port: int = Field(8080, ge=0, le=65535, description="the API's port (0: any free port)")
    api_workers: int = Field(1, ge=1, le=64, description="API server processes")
    worker_concurrency: int = Field(
        1, ge=1, le=64, description="processes per `tillflow cloud worker`"
    )
    sweep_interval_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="seconds between sweeps that submit runs come due or left by a lost message",
    )
    offline_after_s: float = Field(
        3600.0, gt=0, description="a device not synced for this long is raised by AuditAggregation"
    )
    audit_aggregation_interval_s: float = Field(
        86400.0, gt=0, description="seconds between two AuditAggregation runs (a day)"
    )
    control_schedules: bool = Field(
        True,
        description="this worker's sweep starts AuditAggregation and SilentDevices when due "
        "(once per slot across every worker that does)",
    )
    acquirer_url: str | None = Field(
        None,
        description="the acquirer's status API (GET /lookup), to resolve unknown outcomes",
    )
    release_pubkey_file: Path | None = Field(
        None,
        description="the release public key (PEM, `make release-key`'s release.pub) an "
        "uploaded terminal bundle must verify under; unset: uploads are refused",
    )
    log_format: Literal["json", "text"] = Field("text", description="json under systemd")
    workflow_dirs: list[Path] = Field(
        default_factory=list,
        description="more directories of workflow YAML the cloud's engine registers, "
        "beside cloud/workflows",
    )
    step_modules: list[str] = Field(
        default_factory=list,
        description="more step modules (dotted names) the cloud's engine imports at start, "
        "beside cloud.engine.STEP_MODULES; one may declare SCHEDULES of its workflows",
    )

    def key_path(self) -> Path:
        return self.signing_key_file.expanduser()

    def data_path(self) -> Path:
        return self.data_dir.expanduser()


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    **flags: Any,
) -> CloudSettings:
    """The settings: defaults, then ``path`` (else ``$TILLFLOW_CLOUD_CONFIG``), then
    ``TILLFLOW_*`` variables, then ``flags`` whose value is not None."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    where = path if path is not None else env.get(CONFIG_ENV)
    if where:
        p = Path(where)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the settings must be a YAML mapping")
        data.update(loaded)
        sources.update({str(k): str(p) for k in loaded})
    for name in CloudSettings.model_fields:
        var = ENV_PREFIX + name.upper()
        if env.get(var):
            data[name] = env[var]
            sources[name] = f"${var}"
    for name, value in flags.items():
        if value is not None:
            data[name] = value
            sources[name] = "--" + name.replace("_", "-")
    try:
        return CloudSettings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(x) for x in err["loc"]) or "(top)"
            origin = sources.get(str(err["loc"][0]) if err["loc"] else "", "settings")
            problems.append(f"{origin}: {field}: {err['msg']}")
        raise ConfigError("invalid control-plane settings:\n  " + "\n  ".join(problems)) from exc


def describe_options() -> list[tuple[str, str, str]]:
    """(option, variable, description) of every setting: the README's table and --help."""
    rows = []
    for name, field in CloudSettings.model_fields.items():
        rows.append((name, ENV_PREFIX + name.upper(), field.description or ""))
    return rows
