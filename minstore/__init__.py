"""minstore: a small replicated record store with a REST API."""

__version__ = "0.1.0"
