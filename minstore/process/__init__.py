"""
Processes: the steps a record goes through on the node that takes a
client's write.  Built-ins are ``lang`` and ``schema``; a package adds one,
without editing minstore, through the ``minstore.processes`` entry point
group, naming an L{minstore.interfaces.IProcessFactory}.
"""

from twisted.internet.defer import succeed

from minstore.process.lang import LanguageDetection
from minstore.process.schema import SchemaValidation
from minstore.storage import _entry_points

BUILTIN = {"lang": LanguageDetection, "schema": SchemaValidation}
DEFAULT = "lang,schema"


def available_processes():
    factories = dict(BUILTIN)
    for ep in _entry_points("minstore.processes"):
        factories.setdefault(ep.name, ep)
    return factories


def make_processes(names, options):
    """
    The processes named (in order), built with the node's options; a
    KeyError names the first unknown one.
    """
    factories = available_processes()
    processes = []
    for name in names:
        if name not in factories:
            raise KeyError(name)
        factory = factories[name]
        if hasattr(factory, "load"):
            factory = factory.load()
        processes.append(factory(options))
    return processes


def run_pipeline(record, processes, in_thread):
    """
    Chain the processes as Deferred callbacks; ``in_thread(f, arg)`` runs
    the CPU-heavy ones away from the reactor thread.
    """
    d = succeed(record)
    for process in processes:
        if getattr(process, "threaded", False):
            d.addCallback(lambda r, p=process: in_thread(p, r))
        else:
            d.addCallback(process)
    return d
