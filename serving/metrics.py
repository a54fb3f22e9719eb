"""Request metrics per endpoint, modality and status, in Prometheus format.

Two exports, for two readers:
- the gateway's own registry (prometheus_client), served at GET /metrics together with Serve's own
  `ray_serve_*` series read from this node's Ray metrics agent: one URL to scrape on one machine;
- the same counters as `ray.serve.metrics` (exported by every node's Ray metrics agent as
  `ray_raybind_*`, tagged with deployment and replica): the cluster-wide view when there are
  several gateway replicas or nodes (scrape each node's metrics export port).
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

log = logging.getLogger("ray.serve")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RequestMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["endpoint", "modality", "status"]
        self.requests = Counter("raybind_requests", "HTTP requests by endpoint, input modality and status code",
                                labels, registry=self.registry)
        self.items = Counter("raybind_items", "items embedded by endpoint and modality", ["endpoint", "modality"],
                             registry=self.registry)
        self.latency = Histogram("raybind_request_seconds", "request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self._ray = _ray_mirrors()
        self._node_metrics_url: str | None = None

    def observe(self, endpoint: str, modalities: Tally, status: int, seconds: float) -> None:
        """One finished request; `modalities` counts its items per modality ("none" if it had none)."""
        kinds = modalities or Tally({"none": 0})
        for modality, count in kinds.items():
            self.requests.labels(endpoint, modality, str(status)).inc()
            if count and status < 400:
                self.items.labels(endpoint, modality).inc(count)
            if self._ray:
                self._ray[0].inc(tags={"endpoint": endpoint, "modality": modality, "status": str(status)})
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry) + self.serve_series()

    def serve_series(self) -> bytes:
        """Serve's own `ray_serve_*` series from this node's Ray metrics agent (b"" outside Ray)."""
        urls = [self._node_metrics_url] if self._node_metrics_url else _node_metrics_urls()
        text = None
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    text = resp.read()
                self._node_metrics_url = url
                break
            except OSError as exc:
                log.warning("cannot read Serve metrics from %s: %s", url, exc)
        if text is None:
            return b""
        keep = [line for line in text.splitlines()
                if line.startswith((b"ray_serve_", b"# HELP ray_serve_", b"# TYPE ray_serve_"))]
        return b"\n".join(keep) + b"\n" if keep else b""


def _ray_mirrors() -> tuple | None:
    """ray.serve.metrics counters when running inside a Ray worker, else None (in-process tests)."""
    try:
        import ray
        from ray.serve import metrics as serve_metrics

        if not ray.is_initialized():
            return None
        return (serve_metrics.Counter("raybind_requests", description="HTTP requests by endpoint, modality, status",
                                      tag_keys=("endpoint", "modality", "status")),)
    except Exception as exc:  # metrics must never stop the gateway from serving
        log.warning("ray.serve.metrics unavailable: %s", exc)
        return None


def _node_metrics_urls() -> list[str]:
    """This node's Ray metrics agent: at the node's address, else loopback (where the agent of a
    loopback-only local cluster listens)."""
    try:
        import ray

        if not ray.is_initialized():
            return []
        node_id = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        port = node["MetricsExportPort"]
        return [f"http://{node['NodeManagerAddress']}:{port}/metrics", f"http://127.0.0.1:{port}/metrics"]
    except Exception as exc:
        log.warning("no Ray metrics agent found: %s", exc)
        return []


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
