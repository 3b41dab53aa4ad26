"""The layer rules (DESIGN.md) hold on this tree, and the checker can fail."""

from __future__ import annotations

from pathlib import Path

import layers


def test_layers__the_source_tree_keeps_every_rule():
    assert layers.check() == []


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_layers__each_kind_of_violation_is_reported_with_file_and_line(tmp_path):
    root = _tree(
        tmp_path,
        {
            "edge/__init__.py": "",
            "edge/engine/__init__.py": "",
            "edge/engine/bad.py": "import json\nfrom edge.store import sqlite\n",
            "edge/engine/rel.py": "from ..terminal import runtime\n",
            "edge/terminal/up.py": "import cloud.store\nimport psycopg\n",
            "edge/store/s.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from edge.terminal.runtime import Terminal\n",
            "hardware-sim/sim.py": "from cloud import api\nimport httpx\n",
            "cloud/ok.py": "import psycopg\nfrom edge.engine import Engine\n",
        },
    )
    problems = layers.check(root)
    assert problems == [
        "edge/engine/bad.py:2: edge.engine may not import edge.store",
        "edge/engine/rel.py:1: edge.engine may not import edge.terminal",
        "edge/store/s.py:3: edge.store may not import edge.terminal.runtime",
        "edge/terminal/up.py:1: edge may not import cloud (cloud.store)",
        "edge/terminal/up.py:2: edge may not import third-party psycopg",
        "hardware-sim/sim.py:1: hwsim may not import cloud (cloud)",
    ]
