"""Prometheus metrics under vLLM's names, so dashboards and gateways built for vLLM work.

Request-level series (tokens, latencies, finished requests) are recorded as requests run;
engine-state series (running, waiting, KV usage, prefix cache, preemptions) are read from the
engine's latest stats snapshot at scrape time.
"""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from atom_jax.async_llm import StatObserver

__all__ = ["ServingMetrics", "CONTENT_TYPE_LATEST"]

disable_created_metrics()  # no *_created series, as vLLM exposes none

# vLLM's buckets
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


class ServingMetrics(StatObserver):
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name, "engine": "0"}
        names = list(self.labels)
        r = self.registry

        def counter(name, doc, extra=()):
            return Counter(name, doc, names + list(extra), registry=r)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, names, buckets=buckets, registry=r).labels(**self.labels)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.") \
            .labels(**self.labels)
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.").labels(**self.labels)
        self.request_success = counter("vllm:request_success",
                                       "Count of successfully processed requests.", ["finished_reason"])
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", _TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", _ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", _E2E_BUCKETS)
        self._stats = lambda: None
        r.register(_EngineCollector(self))

    def bind(self, stats_fn) -> None:
        """stats_fn() -> the engine's latest EngineStats (AsyncLLM.stats)."""
        self._stats = stats_fn

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # StatObserver (called from the engine thread; prometheus_client is thread-safe)
    def request_added(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def tokens_generated(self, num_tokens: int) -> None:
        self.generation_tokens.inc(num_tokens)

    def first_token(self, seconds_since_arrival: float) -> None:
        self.ttft.observe(seconds_since_arrival)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def request_finished(self, e2e_seconds: float, finish_reason: str) -> None:
        self.e2e.observe(e2e_seconds)
        self.request_success.labels(**self.labels, finished_reason=finish_reason).inc()


class _EngineCollector:
    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        s = self.metrics._stats()
        labels = self.metrics.labels
        names, values = list(labels), list(labels.values())

        def family(kind, name, doc, value):
            f = kind(name, doc, labels=names)
            f.add_metric(values, value)
            return f

        if s is None:
            return
        yield family(GaugeMetricFamily, "vllm:num_requests_running",
                     "Number of requests in model execution batches.", s.num_running)
        yield family(GaugeMetricFamily, "vllm:num_requests_waiting",
                     "Number of requests waiting to be processed.", s.num_waiting)
        yield family(GaugeMetricFamily, "vllm:kv_cache_usage_perc",
                     "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage)
        yield family(CounterMetricFamily, "vllm:prefix_cache_queries",
                     "Prefix cache queries, in terms of number of queried tokens.",
                     s.prefix_cache_queries)
        yield family(CounterMetricFamily, "vllm:prefix_cache_hits",
                     "Prefix cache hits, in terms of number of cached tokens.", s.prefix_cache_hits)
        yield family(CounterMetricFamily, "vllm:num_preemptions",
                     "Cumulative number of preemptions from the engine.", s.num_preemptions)
