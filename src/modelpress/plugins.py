"""Plugins: the method packages register their passes and saved-state codecs when imported.

Nothing below the methods imports them (the layers forbid it); instead the registries ask for every
plugin here. Plugins are the ``modelpress.plugins`` entry points of the installed distributions (this
package declares prune, quantize, recover and fuse in pyproject.toml, other packages can add their own); when the
package runs from a source tree without installed metadata, the built-in list is used. A plugin that
fails to import is an error, not a silently missing pass.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from modelpress.errors import ModelpressError

GROUP = "modelpress.plugins"
BUILTIN = {
    "prune": "modelpress.prune.plugin",
    "quantize": "modelpress.quantize.plugin",
    "recover": "modelpress.recover.plugin",
    "fuse": "modelpress.fuse.plugin",
}

_loaded: dict[str, str] = {}


def plugin_modules() -> dict[str, str]:
    """Name -> module of every plugin: the entry points, then any built-in one they do not name."""
    found = {ep.name: ep.value for ep in metadata.entry_points(group=GROUP)}
    for name, module in BUILTIN.items():
        found.setdefault(name, module)
    return found


def load_plugins() -> dict[str, str]:
    """Import every plugin module once (each registers its passes and codecs); returns name -> module."""
    for name, module in plugin_modules().items():
        if name in _loaded:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ModelpressError(
                f"plugin {name!r} ({module}) cannot be imported: {exc}",
                "reinstall modelpress (pip install -e .) or the package that provides the plugin",
            ) from exc
        _loaded[name] = module
    return dict(_loaded)
