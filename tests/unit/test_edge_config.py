"""The terminal's configuration: YAML + TILLFLOW_* overrides, clear errors, documented."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import edge.terminal
from edge.cli import main
from edge.errors import ConfigError
from edge.terminal.config import EdgeConfig, load_config, on_reload, options, reload_mode

EXAMPLE = Path(edge.terminal.__file__).with_name("edge.example.yaml")
README = Path(__file__).resolve().parents[2] / "README.md"


def test_config__the_shipped_example_is_valid():
    cfg = load_config(EXAMPLE, environ={})
    assert cfg.device_id == "T-0001" and cfg.risk.floor_limit_minor == 2500
    assert cfg.schedules[0].workflow == "settlement"
    assert cfg.database_path == Path("/var/lib/tillflow/terminal.db")


def test_config__environment_overrides_nested_fields_with_yaml_typed_values(tmp_path):
    f = tmp_path / "edge.yaml"
    f.write_text("device_id: T-1\n")
    env = {
        "TILLFLOW_DEVICE_ID": "T-0042",
        "TILLFLOW_RISK__FLOOR_LIMIT_MINOR": "5000",
        "TILLFLOW_PERIPHERALS__ACQUIRER__URL": "http://10.0.0.1:9000",
        "TILLFLOW_DATABASE_URL": "ignored: read by the CLI, not an override",
    }
    cfg = load_config(f, environ=env)
    assert cfg.device_id == "T-0042"
    assert cfg.risk.floor_limit_minor == 5000
    assert cfg.peripherals.acquirer.url == "http://10.0.0.1:9000"


def test_config__errors_name_the_file_and_every_bad_field(tmp_path):
    f = tmp_path / "edge.yaml"
    f.write_text("device_id: T-1\nsynchronous: SOMETIMES\nrisk: {floor_limit_minor: -1, typo: 3}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f, environ={})
    text = str(exc.value)
    assert f"{f}: synchronous" in text
    assert f"{f}: risk.floor_limit_minor" in text
    assert f"{f}: risk.typo" in text


def test_config__a_bad_override_names_the_variable(tmp_path):
    f = tmp_path / "edge.yaml"
    f.write_text("device_id: T-1\n")
    with pytest.raises(
        ConfigError, match=re.escape("TILLFLOW_RISK__VELOCITY_MAX: risk.velocity_max")
    ):
        load_config(f, environ={"TILLFLOW_RISK__VELOCITY_MAX": "lots"})


def test_config__missing_device_id_and_unreadable_file_are_clear(tmp_path):
    f = tmp_path / "edge.yaml"
    f.write_text("data_dir: /tmp\n")
    with pytest.raises(ConfigError, match="device_id: Field required"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_config__every_option_is_documented_in_the_readme():
    readme = README.read_text()
    missing = [name for name, _, _ in options() if not re.search(rf"`{re.escape(name)}`", readme)]
    assert missing == []


def test_cli__edge_config_check_prints_the_options_or_the_problems(tmp_path, capsys):
    assert main(["edge", "config", "check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok ") and "risk.floor_limit_minor" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: T-1\ndb_budget_mb: 0.1\n")
    assert main(["edge", "config", "check", str(bad)]) == 1
    assert "db_budget_mb" in capsys.readouterr().err


def test_cli__edge_outbox_shows_depth_and_next_messages(tmp_path, capsys):
    db = str(tmp_path / "t.db")
    payment = str(Path(edge.terminal.__file__).parents[1] / "examples" / "payment.yaml")
    assert main(["run", payment, "--db", db, "--input", '{"amount": 5, "currency": "EUR"}']) == 0
    capsys.readouterr()
    assert main(["edge", "outbox", "--db", db]) == 0
    out = capsys.readouterr().out
    assert out.startswith("outbox: 1 message(s)") and " sale " in out


def test_cli__edge_config_check_prints_each_value_as_json_not_a_python_repr(capsys):
    assert main(["edge", "config", "check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "PosixPath(" not in out and "Schedule(" not in out
    dumped = load_config(EXAMPLE).model_dump(mode="json")
    lines = out.splitlines()[1:]
    assert len(lines) == len(options())
    for line, (name, _, _) in zip(lines, options(), strict=True):
        shown_name, shown = line.split(None, 1)
        expected = dumped
        for part in name.split("."):
            expected = None if expected is None else expected[part]  # an absent section
        assert (shown_name, json.loads(shown)) == (name, expected)
    assert '  data_dir                                 "/var/lib/tillflow"' in lines
    assert any(line.startswith("  schedules ") and '"cron": "0 23 * * *"' in line for line in lines)


def test_config__the_readme_sections_the_example_names_exist():
    comments = [ln for ln in EXAMPLE.read_text().splitlines() if ln.startswith("#")]
    named = re.findall(r'"([^"]+)"', " ".join(c.lstrip("# ") for c in comments))
    headings = {m for m in re.findall(r"^#+ (.+)$", README.read_text(), flags=re.M)}
    assert named, "the example points at no README section"
    assert [n for n in named if n not in headings] == []


def test_config__every_option_says_whether_a_reload_applies_it_in_the_model_readme_and_example():
    modes = {name: reload_mode(name) for name in EdgeConfig.model_fields}
    assert set(modes.values()) == {"live", "restart"}  # reload_mode raises on one unsaid
    readme = README.read_text()
    for name, _, _ in options():  # nested options go with their top-level one
        row = rf"^\| `{re.escape(name)}` \| [^|]+ \| {reload_mode(name)} \|"
        assert re.search(row, readme, re.M), name
    example = EXAMPLE.read_text()
    listed: dict[str, str] = {}
    for mode, names in re.findall(r"^#\s+(live|restart): ((?:.*\n#\s{4,}.*)*.*)$", example, re.M):
        for name in re.split(r"[,\s#]+", names.strip()):
            if name:
                listed[name] = mode
    assert listed == modes


def test_config__on_reload_the_live_options_change_and_the_restart_only_ones_wait(tmp_path):
    running = EdgeConfig(device_id="T-1", data_dir=tmp_path, db_budget_mb=8)
    loaded = EdgeConfig(
        device_id="T-1", data_dir=tmp_path, db_budget_mb=16, retention_hours=24,
        risk={"floor_limit_minor": 5_000}, peripherals={"acquirer": {"timeout_s": 3}},
    )  # fmt: skip
    in_force, waiting = on_reload(running, loaded)
    assert waiting == ["db_budget_mb", "peripherals"]
    assert (in_force.db_budget_mb, in_force.peripherals) == (8, running.peripherals)
    assert (in_force.retention_hours, in_force.risk.floor_limit_minor) == (24, 5_000)
    assert on_reload(running, running) == (running, [])
