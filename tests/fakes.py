"""The in-memory fakes live in the package: L{minstore.testing.fakes}."""

from minstore.testing.fakes import JSON, T0, Cluster, FakeNetwork, Member, replica, tombstone, url, version  # noqa: F401
