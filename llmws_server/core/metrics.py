"""What a Prometheus scrape of GET /metrics sees (prometheus_client, a registry per server): requests by
outcome, time to first token, tokens per second, tokens in and out, the queue, sessions, resumes and
replayed messages, model switches and memory."""
import time
from collections.abc import Callable, Iterator

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmws_server import resources
from llmws_server.core.events import Done, Event, Failed, ModelLoaded, Started, Text
from llmws_server.core.jobs import Job, SwitchJob

SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class Metrics:
    def __init__(self, waiting: Callable[[], int], sessions: Callable[[], int]):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("llmws_requests", "Requests that ended, by finish reason or error", ["outcome"],
                                registry=registry)
        self.first_token = Histogram("llmws_time_to_first_token_seconds", "From queued to the first text",
                                     buckets=SECONDS, registry=registry)
        self.rate = Histogram("llmws_tokens_per_second", "Generation rate of each request that ended",
                              buckets=RATES, registry=registry)
        self.tokens_in = Counter("llmws_prompt_tokens", "Prompt tokens of requests that started", registry=registry)
        self.tokens_out = Counter("llmws_generated_tokens", "Tokens generated", registry=registry)
        self.resumes = Counter("llmws_resumes", "Sessions taken up again by a client", registry=registry)
        self.replayed = Counter("llmws_replayed_messages", "Buffered messages sent again on a resume",
                                registry=registry)
        self.switches = Counter("llmws_model_switches", "Model switches, by outcome", ["outcome"], registry=registry)
        self.connections: Callable[[], int] = lambda: 0  # the WebSocket front end says how many it holds
        gauges = {"llmws_queue_depth": ("Requests waiting", waiting),
                  "llmws_sessions": ("Sessions kept (with a client or resumable)", sessions),
                  "llmws_connections": ("Open WebSocket connections", lambda: self.connections()),
                  "llmws_process_resident_bytes": ("The server's resident memory",
                                                   lambda: psutil.Process().memory_info().rss),
                  "llmws_device_free_bytes": ("Free memory where the model runs (GPU, else system)",
                                              resources.free_memory_bytes)}
        for name, (text, value) in gauges.items():
            Gauge(name, text, registry=registry).set_function(value)

    def watch_replicas(self, status: Callable[[], list[dict]]) -> None:
        """Engine replicas (core/replicas.py): each one's state, requests and restarts at every scrape."""
        self.registry.register(ReplicaCollector(status))

    def observe(self, job: Job, event: Event) -> None:
        """A job's event on its way out (any thread)."""
        if isinstance(event, Started):
            self.tokens_in.inc(event.tokens_in)
        elif isinstance(event, Text) and not job.answered:
            job.answered = True
            self.first_token.observe(time.monotonic() - job.created)
        elif isinstance(event, Done):
            self.requests.labels(event.reason.value).inc()
            self.tokens_out.inc(event.tokens)
            if event.tokens:
                self.rate.observe(event.tokens_per_s)
        elif isinstance(event, Failed):
            (self.switches.labels("failed") if isinstance(job, SwitchJob) else self.requests.labels("error")).inc()
        elif isinstance(event, ModelLoaded) and not event.reloaded:
            self.switches.labels("ok").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ReplicaCollector(Collector):
    """llmws_replica_serving (1 or 0), llmws_replica_requests and llmws_replica_restarts, labelled by
    replica, node, device and state."""

    def __init__(self, status: Callable[[], list[dict]]):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        labels = ["replica", "node", "device", "state"]
        families = {"serving": GaugeMetricFamily("llmws_replica_serving", "1 while the replica serves", labels=labels),
                    "requests": GaugeMetricFamily("llmws_replica_requests", "Requests the replica holds",
                                                  labels=labels),
                    "restarts": GaugeMetricFamily("llmws_replica_restarts", "Times Ray restarted it", labels=labels)}
        for replica in self.status():
            values = [str(replica["index"]), str(replica["node"]), str(replica["device"]), replica["state"]]
            families["serving"].add_metric(values, float(replica["state"] == "serving"))
            families["requests"].add_metric(values, replica["requests"])
            families["restarts"].add_metric(values, replica["restarts"])
        yield from families.values()
