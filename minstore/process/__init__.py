"""
Processes: the steps a record goes through on the node that takes a
client's write.  Built-ins are ``lang`` and ``schema``; a package adds one,
without editing minstore, through the ``minstore.processes`` entry point
group, naming an L{minstore.interfaces.IProcessFactory}.
"""

from twisted.internet.defer import succeed

from minstore.process.lang import LanguageDetection
from minstore.process.schema import SchemaValidation
from minstore._util import available, load

BUILTIN = {"lang": LanguageDetection, "schema": SchemaValidation}
DEFAULT = "lang,schema"


def available_processes():
    return available(BUILTIN, "minstore.processes")


def make_processes(names, options):
    """
    The processes named (in order), built with the node's options; a
    KeyError names the first unknown one.
    """
    factories = available_processes()
    return [load(factories, name)(options) for name in names]


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
