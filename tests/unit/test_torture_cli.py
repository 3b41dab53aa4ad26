"""``python -m hwsim.torture`` (``make torture``): runs the torture and prints the tally."""

from __future__ import annotations

import json

import pytest
from hwsim import torture


def test_torture__prints_a_json_tally_and_exits_0_without_violations(tmp_path, capsys):
    code = torture.main(["--kills", "0", "--cuts", "3", "--seed", "4", "--quiet",
                         "--workdir", str(tmp_path)])  # fmt: skip
    tally = json.loads(capsys.readouterr().out)
    assert code == 0, tally
    assert tally["power"]["cuts"] >= 3 and tally["power"]["seed"] == 4
    assert "lost_answers" in tally["power"]  # the lost answer and outage fault is counted
    assert "kill" not in tally and tally["violations_total"] == 0


def test_torture__refuses_a_negative_count(capsys):
    with pytest.raises(SystemExit) as info:
        torture.main(["--cuts", "-1"])
    assert info.value.code == 2
    assert "--kills and --cuts must be 0 or more" in capsys.readouterr().err
