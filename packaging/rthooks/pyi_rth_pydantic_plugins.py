"""Runtime hook of the frozen binary: pydantic's plugin discovery, answered at once.

pydantic looks for plugins (``pydantic`` entry points) as it builds its first model,
through ``pydantic.plugin._loader``, which imports ``importlib.metadata`` -- with email,
zipfile, csv and importlib.resources: ~30 ms of CPU at every start and ~0.3 MB of RSS --
to scan the bundled ``.dist-info`` directories. None of them (pydantic, cryptography,
tillflow) declares a plugin, so the answer is known when the binary is built: none. This
hook puts a loader that says so in that module's place before anything imports pydantic;
the rest of pydantic is untouched. ``tests/unit/test_idle_imports.py`` checks that
pydantic still asks that module's ``get_plugins``, and that no distribution declares a
pydantic plugin.
"""

import sys
import types


def _install() -> None:
    loader = types.ModuleType("pydantic.plugin._loader", "No pydantic plugins are bundled.")

    def get_plugins() -> tuple[()]:
        return ()

    loader.get_plugins = get_plugins  # type: ignore[attr-defined]
    sys.modules["pydantic.plugin._loader"] = loader


_install()
