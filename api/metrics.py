"""Prometheus metrics of one app, in its own registry.

Ledger-derived values (edits by status, queue depth, ledger head, apply latency, quality gates) are
read from the ledger at scrape time by LedgerCollector, so they are right whichever process changed the ledger.
Generation latency and tokens are observed by the routes of this process.
"""
from __future__ import annotations

import logging
import statistics
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from service.errors import KnowpatchError
from service.ledger import repository as repo
from service.queue import OperationQueue

log = logging.getLogger(__name__)

APPLY_LATENCY_WINDOW = 100  # most recent applied edits the apply-latency gauges summarize
GATE_SECONDS_WINDOW = 100  # most recent gated edits the gate-seconds gauges summarize
GENERATE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class LedgerCollector(Collector):
    """Reads the ledger (and the queue) at every scrape."""

    def __init__(self, ledger: sessionmaker[Session], queue: OperationQueue) -> None:
        self.ledger, self.queue = ledger, queue

    def describe(self) -> list[Metric]:
        return []  # no ledger query at registration

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._ledger_metrics()
            yield GaugeMetricFamily("knowpatch_ledger_up", "1 if the ledger answered this scrape", value=1)
        except Exception as exc:  # a scrape must still succeed while the ledger is down
            log.warning("metrics: the ledger did not answer: %s", exc)
            yield GaugeMetricFamily("knowpatch_ledger_up", "1 if the ledger answered this scrape", value=0)
        yield from self._queue_metrics()

    def _ledger_metrics(self) -> Iterator[Metric]:
        with self.ledger() as session:
            counts, pending = repo.status_counts(session), repo.queue_depth(session)
            head_seq, _ = repo.head(session)
            latencies = repo.recent_apply_seconds(session, APPLY_LATENCY_WINDOW)
            gates = repo.gate_stats(session, GATE_SECONDS_WINDOW)
        edits = GaugeMetricFamily("knowpatch_edits", "Edits in the ledger by status", labels=["status"])
        for status, count in counts.items():
            edits.add_metric([status], count)
        yield edits
        yield GaugeMetricFamily("knowpatch_queue_depth", "Ledger operations not finished (queued or applying)",
                                value=pending)
        yield GaugeMetricFamily("knowpatch_ledger_head_seq", "Seq of the last done operation: the model version "
                                "the ledger describes", value=head_seq)
        if latencies:
            yield GaugeMetricFamily("knowpatch_edit_apply_seconds_last", "Seconds from 'applying' to 'applied' "
                                    "of the most recently applied edit (its batch's compute time)", value=latencies[0])
            yield GaugeMetricFamily("knowpatch_edit_apply_seconds_median", "Median seconds from 'applying' to "
                                    f"'applied' over the last {APPLY_LATENCY_WINDOW} applied edits",
                                    value=statistics.median(latencies))
        yield from _gate_metrics(gates)

    def _queue_metrics(self) -> Iterator[Metric]:
        try:
            depth = self.queue.depth()
        except KnowpatchError as exc:
            log.warning("metrics: the queue did not answer: %s", exc.message)
            return
        yield GaugeMetricFamily("knowpatch_queue_messages", "Messages in the work queue (waiting or unacknowledged)",
                                value=depth)


def _gate_metrics(gates: repo.GateStats) -> Iterator[Metric]:
    evaluations = GaugeMetricFamily("knowpatch_gate_evaluations", "Edits whose quality gates were measured, by "
                                    "outcome: passed (applied, or applied then rolled back), rejected, checked "
                                    "(dry runs)", labels=["outcome"])
    for outcome, count in gates.outcomes.items():
        evaluations.add_metric([outcome], count)
    yield evaluations
    rejections = GaugeMetricFamily("knowpatch_gate_rejections", "Rejected edits by the gate that rejected them "
                                   "(efficacy, generalisation, locality_drop, or probe for any probe)", labels=["gate"])
    for gate, count in gates.rejections.items():
        rejections.add_metric([gate], count)
    yield rejections
    if gates.recent_seconds:
        yield GaugeMetricFamily("knowpatch_gate_seconds_last", "Seconds the quality gates took for the most "
                                "recently gated edit (gates_s: its batch's gates)", value=gates.recent_seconds[0])
        yield GaugeMetricFamily("knowpatch_gate_seconds_median", "Median gates_s over the last "
                                f"{GATE_SECONDS_WINDOW} gated edits", value=statistics.median(gates.recent_seconds))


class ApiMetrics:
    """The app's registry and the metrics its routes observe."""

    def __init__(self, ledger: sessionmaker[Session], queue: OperationQueue) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(LedgerCollector(ledger, queue))
        self.generate_seconds = Histogram(
            "knowpatch_generate_seconds", "Latency of generation requests (streams: until the last token)",
            ["endpoint"], buckets=GENERATE_BUCKETS, registry=self.registry)
        self.generated_tokens = Counter(
            "knowpatch_generated_tokens", "Tokens generated", ["endpoint"], registry=self.registry)

    def observe_generation(self, endpoint: str, seconds: float, tokens: int) -> None:
        self.generate_seconds.labels(endpoint).observe(seconds)
        self.generated_tokens.labels(endpoint).inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
