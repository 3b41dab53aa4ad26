"""The frozen binary leaves modules out (packaging/excludes.py): prove from source, in
seconds and without a binary, that no edge or sync module needs one of them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from conftest import REPO

# A child interpreter (nothing imported yet) where every excluded name raises
# ImportError, as it would in the frozen binary; it imports every module the spec
# bundles (all of edge but the examples, all of sync) and prints what failed.
PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    sys.path[:0] = [{packaging!r}, {repo!r}]
    from excludes import EXCLUDES

    blocked = set(EXCLUDES)
    preloaded = sorted(m for m in blocked if m in sys.modules)

    class Block:
        def find_spec(self, name, path=None, target=None):
            parts = name.split(".")
            if any(".".join(parts[:i]) in blocked for i in range(1, len(parts) + 1)):
                raise ImportError(f"excluded from the binary: {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    failed = {{}}
    for pkg in ("edge", "sync"):
        root = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(root.__path__, pkg + "."):
            if info.name.startswith("edge.examples"):
                continue
            try:
                importlib.import_module(info.name)
            except ImportError as exc:
                failed[info.name] = str(exc)
    import httpx, yaml, apsw, pydantic  # what they try optionally must be optional
    print(json.dumps({{"preloaded": preloaded, "failed": failed, "n": len(sys.modules)}}))
    """
)


def test_excludes__no_edge_or_sync_module_needs_an_excluded_module():
    code = PROBE.format(packaging=str(REPO / "packaging"), repo=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["preloaded"] == []
    assert result["failed"] == {}
