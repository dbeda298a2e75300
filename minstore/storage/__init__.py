"""
Storage engines by name.  Built-ins are ``files`` (the default) and
``memory``; a package adds one through the ``minstore.storage`` entry point
group, naming a callable ``factory(data_dir) -> IStorage``.
"""

from importlib.metadata import entry_points

from minstore.storage.files import FileStorage
from minstore.storage.memory import MemoryStorage

BUILTIN = {"files": FileStorage, "memory": MemoryStorage}


def _entry_points(group):
    eps = entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=group))
    return list(eps.get(group, []))  # Python 3.9


def available_engines():
    engines = dict(BUILTIN)
    for ep in _entry_points("minstore.storage"):
        engines.setdefault(ep.name, ep)
    return engines


def make_storage(name, data_dir):
    engines = available_engines()
    if name not in engines:
        raise KeyError(name)
    factory = engines[name]
    if hasattr(factory, "load"):
        factory = factory.load()
    return factory(data_dir)
