"""
Storage engines by name.  Built-ins are ``files`` (the default),
``sqlite`` and ``memory``, and ``postgresql`` (imported only when asked
for, so a missing driver breaks nothing else); a package adds one through
the ``minstore.storage`` entry point group, naming a callable
``factory(data_dir) -> IStorage``.
"""

from minstore._util import available, load
from minstore.storage.files import FileStorage
from minstore.storage.memory import MemoryStorage
from minstore.storage.sqlite import SQLiteStorage

BUILTIN = {"files": FileStorage, "sqlite": SQLiteStorage, "memory": MemoryStorage}


class _Lazy:
    """A built-in engine imported on first use, like an entry point."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def load(self):
        import importlib

        return getattr(importlib.import_module(self.module), self.name)


#: Built-ins whose module is imported only when the engine is chosen.
LAZY = {"postgresql": _Lazy("minstore.storage.postgresql", "PostgreSQLStorage")}


def available_engines():
    engines = available(BUILTIN, "minstore.storage")
    for name, factory in LAZY.items():
        engines.setdefault(name, factory)
    return engines


def make_storage(name, data_dir, **options):
    """The engine ``name`` on ``data_dir``; ``options`` (``dsn``, ``node_id``) go to engines that take them."""
    return load(available_engines(), name)(data_dir, **options)
