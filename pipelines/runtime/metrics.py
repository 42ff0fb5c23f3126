"""Prometheus metrics of a run: ``headwater run --metrics-port 9464`` serves ``/metrics``.

One endpoint per run: the runner already gathers what its workers report (each step's
counts, the consumer lag, restarts), so the numbers are read from the run's
:class:`~pipelines.runtime.progress.RunState` when Prometheus scrapes, and nothing is counted
twice or on the workers' hot path. The server listens on 127.0.0.1 unless told otherwise
(``--metrics-host``).

Every metric carries the ``pipeline`` label:

- ``headwater_step_records_in_total``, ``..._out_total``, ``..._skipped_total``,
  ``..._dead_lettered_total``, ``..._late_total`` (``step``): what each step was given, passed
  on, skipped, sent to dead letters, found late;
- ``headwater_source_records_written_total`` (``source``): what each source wrote to its topic;
- ``headwater_records_read_total``: records the workers read from the log;
- ``headwater_records_per_second``: the same, averaged over the last seconds;
- ``headwater_consumer_lag_records`` (``topic``, ``partition``): records not processed yet;
- ``headwater_workers``: worker processes reporting now;
- ``headwater_worker_restarts_total``: workers started in place of one that died;
- ``headwater_hot_key_share`` (``topic``, ``partition``, ``key``): the estimated share of a
  partition's records its top keys carry (:mod:`pipelines.runtime.hotkeys`), for the top
  :data:`HOT_KEYS_SHOWN` keys of each partition only, so the keys seen bound no label set.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pipelines.runtime.progress import RunState

__all__ = ["HOT_KEYS_SHOWN", "STEP_COUNTS", "MetricsServer", "RunCollector"]

HOT_KEYS_SHOWN = 3
"""Top keys per partition with a ``headwater_hot_key_share`` series."""
STEP_COUNTS = ("in", "out", "skipped", "dead_lettered", "late")
"""The counts a step reports, in the order of :meth:`RunState.step_totals`."""


class RunCollector(Collector):
    """The metrics of one run, read from its state at each scrape."""

    def __init__(self, state: RunState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        pipeline = state.topology.pipeline.name
        totals = state.step_totals()
        for i, name in enumerate(STEP_COUNTS):
            family = CounterMetricFamily(
                f"headwater_step_records_{name}",
                f"Records a step {_WHAT[name]}",
                labels=["pipeline", "step"],
            )
            for step_id, counts in sorted(totals.items()):
                family.add_metric([pipeline, step_id], counts[i])
            yield family
        written = CounterMetricFamily(
            "headwater_source_records_written",
            "Records a source wrote to its topic",
            labels=["pipeline", "source"],
        )
        for source in list(state.sources):
            written.add_metric([pipeline, source.step_id], source.records)
        yield written
        read = CounterMetricFamily(
            "headwater_records_read", "Records the workers read from the log", labels=["pipeline"]
        )
        read.add_metric([pipeline], state.records)
        yield read
        rate = GaugeMetricFamily(
            "headwater_records_per_second",
            "Records read per second, averaged over the last seconds",
            labels=["pipeline"],
        )
        rate.add_metric([pipeline], state.rate)
        yield rate
        lag = GaugeMetricFamily(
            "headwater_consumer_lag_records",
            "Records of a partition the group has not processed yet",
            labels=["pipeline", "topic", "partition"],
        )
        for tp, behind in sorted(list(state.lag.items())):
            lag.add_metric([pipeline, tp.topic, str(tp.partition)], behind)
        yield lag
        workers = GaugeMetricFamily(
            "headwater_workers", "Worker processes reporting now", labels=["pipeline"]
        )
        workers.add_metric([pipeline], sum(not r.done for r in list(state.reports.values())))
        yield workers
        restarts = CounterMetricFamily(
            "headwater_worker_restarts",
            "Workers started in place of one that was killed or crashed",
            labels=["pipeline"],
        )
        restarts.add_metric([pipeline], state.restarts)
        yield restarts
        hot = GaugeMetricFamily(
            "headwater_hot_key_share",
            "Estimated share of a partition's records that one of its top keys carries",
            labels=["pipeline", "topic", "partition", "key"],
        )
        for load in state.hot_keys():
            for key, share in load.top[:HOT_KEYS_SHOWN]:
                hot.add_metric([pipeline, load.topic, str(load.partition), key], share)
        yield hot


_WHAT = {
    "in": "was given",
    "out": "passed on",
    "skipped": "skipped (error policy SKIP)",
    "dead_lettered": "sent to the dead-letter topic",
    "late": "found late (event time behind the watermark)",
}


class MetricsServer:
    """``/metrics`` for one run, served from a thread while the run goes on."""

    def __init__(self, state: RunState, port: int, host: str = "127.0.0.1") -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RunCollector(state))
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)

    @property
    def port(self) -> int:
        """The port it listens on (the one asked for, or the one the system gave for 0)."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
