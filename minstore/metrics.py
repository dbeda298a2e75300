"""Prometheus metrics of a node, in a registry of its own."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class NodeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "minstore_http_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "minstore_http_request_duration_seconds",
            "Time from a request's arrival to its answer, by route and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.storage = Histogram(
            "minstore_storage_operation_duration_seconds",
            "Time spent in the storage engine, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.records = Gauge(
            "minstore_records", "Live records held by this node.", registry=self.registry
        )
        self.batch_size = Histogram(
            "minstore_write_batch_size",
            "Writes made durable together by one storage call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.lookup_bad_answers = Counter(
            "minstore_lookup_bad_answers",
            "Peer answers to a lookup that were not the record asked for, counted as that peer missing.",
            ["peer"],
            registry=self.registry,
        )
        # labels() costs a dict lookup and a lock; the hot path keeps children.
        self._children = {}

    def observe_request(self, route, method, status, seconds):
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route, method),
            )
        children[0].inc()
        children[1].observe(seconds)

    def exposition(self):
        return generate_latest(self.registry)
