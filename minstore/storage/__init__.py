"""
Storage engines by name.  Built-ins are ``files`` (the default),
``sqlite`` and ``memory``; a package adds one through the ``minstore.storage`` entry point
group, naming a callable ``factory(data_dir) -> IStorage``.
"""

from minstore._util import available, load
from minstore.storage.files import FileStorage
from minstore.storage.memory import MemoryStorage
from minstore.storage.sqlite import SQLiteStorage

BUILTIN = {"files": FileStorage, "sqlite": SQLiteStorage, "memory": MemoryStorage}


def available_engines():
    return available(BUILTIN, "minstore.storage")


def make_storage(name, data_dir):
    return load(available_engines(), name)(data_dir)
