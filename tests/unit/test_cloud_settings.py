"""cloud.settings: defaults, then the YAML file, then ``TILLFLOW_*``, then flags (last
wins); every error names where the bad value came from (file, variable or flag) and
the field; describe_options() lists every option (the README's table)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cloud.settings import CONFIG_ENV, CloudSettings, describe_options, load_settings
from edge.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "cloud.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults__unset_servers_mean_embedded() -> None:
    s = load_settings(environ={})
    assert s == CloudSettings()
    assert s.database_url is None and s.broker_url is None  # cloud.embedded's cue
    assert (s.host, s.port, s.api_workers, s.log_format) == ("127.0.0.1", 8080, 1, "text")


def test_precedence__file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 9000\nhost: 0.0.0.0\napi_workers: 2\nlog_format: json\n")
    env = {"TILLFLOW_PORT": "9100", "TILLFLOW_API_WORKERS": "3"}
    s = load_settings(path, environ=env, port=9200, api_workers=None)
    assert s.port == 9200  # the flag wins over the variable and the file
    assert s.api_workers == 3  # a flag left None does not count: the variable wins
    assert s.host == "0.0.0.0"  # only the file says it
    assert s.log_format == "json"
    assert s.sweep_interval_s == CloudSettings().sweep_interval_s  # nobody says it


def test_file__from_the_config_variable_when_no_path_is_given(tmp_path: Path) -> None:
    path = write(tmp_path, "database_url: postgresql://u@db:5432/x\n")
    s = load_settings(environ={CONFIG_ENV: str(path)})
    assert s.database_url == "postgresql://u@db:5432/x"
    # A path given wins over the variable.
    other = write(tmp_path, "database_url: postgresql://u@other:5432/y\n", "other.yaml")
    assert load_settings(other, environ={CONFIG_ENV: str(path)}).database_url.endswith("/y")


def test_environment__empty_variable_counts_as_unset(tmp_path: Path) -> None:
    path = write(tmp_path, "broker_url: redis://127.0.0.1:6379/2\n")
    assert load_settings(path, environ={"TILLFLOW_BROKER_URL": ""}).broker_url.endswith("/2")


def test_empty_file__is_the_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, ""), environ={}) == CloudSettings()


def test_error__unknown_field_in_the_file_names_the_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "prot: 8080\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(path, environ={})
    assert f"{path}: prot:" in str(exc.value)


def test_error__bad_value_in_the_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 70000\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(path, environ={})
    assert f"{path}: port:" in str(exc.value)
    assert "65535" in str(exc.value)


def test_error__bad_variable_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 9000\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(path, environ={"TILLFLOW_PORT": "eighty"})
    assert "$TILLFLOW_PORT: port:" in str(exc.value)


def test_error__bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={}, api_workers=0)
    assert "--api-workers: api_workers:" in str(exc.value)


def test_error__every_problem_is_listed_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "log_format: xml\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(path, environ={"TILLFLOW_SWEEP_INTERVAL_S": "-1"})
    text = str(exc.value)
    assert (
        f"{path}: log_format:" in text and "$TILLFLOW_SWEEP_INTERVAL_S: sweep_interval_s:" in text
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("port: [8080\n", "not valid YAML"), ("- port\n- 8080\n", "must be a YAML mapping")],
)
def test_error__a_file_that_is_no_mapping_names_the_file(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_settings(path, environ={})
    assert str(exc.value).startswith(f"{path}: ") and expected in str(exc.value)


def test_error__a_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={CONFIG_ENV: str(missing)})
    assert str(exc.value).startswith(f"{missing}: cannot read")


def test_settings__are_frozen_and_expand_home(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = load_settings(environ={"TILLFLOW_DATA_DIR": "~/cloud"})
    assert s.data_path() == tmp_path / "cloud"
    assert s.key_path() == tmp_path / ".tillflow" / "control-plane.key"
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]


def test_describe_options__every_field_with_its_variable_and_a_description() -> None:
    rows = describe_options()
    assert [name for name, _, _ in rows] == list(CloudSettings.model_fields)
    for name, variable, description in rows:
        assert variable == "TILLFLOW_" + name.upper()
        assert description, f"{name} has no description (the README's table needs one)"
    # The variable named is the one load_settings reads.
    variables = {name: variable for name, variable, _ in rows}
    for name in ("database_url", "broker_url", "host"):
        assert getattr(load_settings(environ={variables[name]: "x://y"}), name) == "x://y"
