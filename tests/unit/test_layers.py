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


def test_layers__an_import_cycle_inside_a_package_is_reported_with_its_first_import(tmp_path):
    root = _tree(
        tmp_path,
        {
            "edge/__init__.py": "",
            "edge/engine/__init__.py": "",
            # a cycle that holds only for the type checker is still a cycle
            "edge/engine/a.py": "from edge.engine import b\n",
            "edge/engine/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from edge.engine.a import A\n",
            "edge/engine/c.py": "from edge.engine import a, b\n",  # uses both: no cycle
            # a package's __init__ and a module of its subpackage, relative imports
            "edge/terminal/__init__.py": "from .service.daemon import Daemon\n",
            "edge/terminal/service/__init__.py": "",
            "edge/terminal/service/daemon.py": "import json\n\n\ndef f():\n"
            "    from edge.terminal import Terminal\n",
            "sync/x.py": "from . import y\n",
            "sync/y.py": "import sync.z\n",
            "sync/z.py": "from .x import X\nfrom .y import Y\n",
        },
    )
    assert layers.cycle_problems(root) == [
        "edge/engine/a.py:1: import cycle in edge.engine: "
        "edge.engine.a -> edge.engine.b -> edge.engine.a",
        "edge/terminal/__init__.py:1: import cycle in edge.terminal: "
        "edge.terminal -> edge.terminal.service.daemon -> edge.terminal",
        "sync/x.py:1: import cycle in sync: sync.x -> sync.y -> sync.z -> sync.x",
    ]
    assert set(layers.cycle_problems(root)) <= set(layers.check(root))


def test_layers__a_cycle_reports_the_modules_tangled_with_it(tmp_path):
    root = _tree(
        tmp_path,
        {
            "cloud/hub.py": "from cloud import one, two\n",
            "cloud/one.py": "from cloud import hub\n",
            "cloud/two.py": "from cloud.hub import X\n",
        },
    )
    assert layers.cycle_problems(root) == [
        "cloud/hub.py:1: import cycle in cloud: cloud.hub -> cloud.one -> cloud.hub "
        "(tangled with it: cloud.two)",
    ]


def test_layers__the_source_tree_has_no_import_cycle_inside_a_package():
    assert layers.cycle_problems() == []
