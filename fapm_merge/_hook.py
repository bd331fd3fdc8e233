"""Lazy registration hook, imported at every Python start by ``fapm_merge_hook.pth``.

mergekit has no plugin discovery. This module installs a tiny meta-path finder that waits for
``mergekit.merge_methods`` to be imported and registers our methods right after it has run,
so plain ``mergekit-yaml``, ``mergekit-multi`` and ``from mergekit.merge import run_merge``
all see ``fapm``. It imports nothing heavy itself and never raises at startup.
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "mergekit.merge_methods"
_PLUGIN = "fapm_merge.methods"


class _RegisterAfterExec(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        # Everything else (get_filename, is_package, get_source, get_resource_reader, ...)
        # is the real loader's, so importlib.resources and inspect still work.
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        # An explicit `import fapm_merge.methods` got here first and registers itself when it
        # finishes; importing it again now would be circular.
        if _PLUGIN in sys.modules:
            return
        try:
            import fapm_merge.methods  # noqa: F401  (registers on import)
        except Exception as error:  # never break mergekit because of the plugin
            print(f"fapm-merge: could not register merge methods: {error}", file=sys.stderr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def install() -> None:
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
