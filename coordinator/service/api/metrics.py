"""Prometheus exposition of the fleet's figures (``GET /metrics``).

Workflow: :func:`new_registry` gives each app its own
:class:`~prometheus_client.CollectorRegistry` holding one :class:`FleetCollector`
(never the process-global registry, so two apps in one process do not clash and
tests see only their own figures). At each scrape the collector calls
:meth:`Operations.metrics() <coordinator.service.operations.Operations.metrics>` once and
:func:`metric_families` turns the :class:`~coordinator.service.operations.FleetMetrics`
into metric families; :func:`render` encodes them in the format the scraper's
``Accept`` header asks for (Prometheus text, or OpenMetrics).

Exposed (all gauges unless noted)::

    fedge_devices_online                        devices online now
    fedge_devices_total                         devices ever seen
    fedge_models{model,version}                 devices serving that model version
    fedge_rollouts{state}                       rollouts per state
    fedge_rollout_stage{rollout}                current stage of a rollout still going
    fedge_rollout_devices{rollout,state}        its devices per state (waiting, installed...)
    fedge_round_accuracy{run,round}             accuracy after a round (latest run)
    fedge_round_uplink_bytes{run,round}         MQTT bytes received for a round
    fedge_round_downlink_bytes{run,round}       MQTT bytes published for a round
    fedge_fleet_latency_ms{quantile}            fleet inference latency quantiles
    fedge_telemetry_ingested_total              counter: telemetry records stored
    fedge_drift_psi{model,version}              latest fleet-wide drift (largest feature PSI)
    fedge_drift_devices{model,version,severity} devices by the severity of their latest drift
    fedge_drift_summaries_rejected_total{reason}  counter: window summaries refused/not scored

:func:`metric_families` is pure (values in, metric families out); only the
collector calls the operations object.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from coordinator.service.operations import FleetMetrics, Operations

__all__ = ["FleetCollector", "metric_families", "new_registry", "render"]

logger = logging.getLogger(__name__)

_ROUND_FIGURES = (
    ("accuracy", "fedge_round_accuracy", "Accuracy after the round (latest run)."),
    ("uplink_bytes", "fedge_round_uplink_bytes", "MQTT payload bytes received for the round."),
    ("downlink_bytes", "fedge_round_downlink_bytes", "MQTT payload bytes published for it."),
)
"""(key in ``RoundRow.metrics``, metric name, help) of the per-round gauges."""


def metric_families(figures: FleetMetrics) -> list[Metric]:
    """Turn the fleet's figures into Prometheus metric families.

    Round figures that are missing or not numbers (an accuracy not measured) are
    left out rather than exported as zero.

    Args:
        figures: What :meth:`Operations.metrics` returned.

    Returns:
        One family per metric name, in a stable order.
    """
    online = GaugeMetricFamily("fedge_devices_online", "Devices online now.")
    online.add_metric([], figures.devices_online)
    total = GaugeMetricFamily("fedge_devices_total", "Devices ever seen.")
    total.add_metric([], figures.devices_total)

    models = GaugeMetricFamily(
        "fedge_models", "Devices serving each model version.", labels=["model", "version"]
    )
    for (model, version), count in sorted(figures.models.items()):
        models.add_metric([model, str(version)], count)

    rollouts = GaugeMetricFamily("fedge_rollouts", "Rollouts per state.", labels=["state"])
    for state, count in sorted(figures.rollouts.items()):
        rollouts.add_metric([state], count)

    stage = GaugeMetricFamily(
        "fedge_rollout_stage", "Current stage of each rollout still going.", labels=["rollout"]
    )
    for rollout_id, index in sorted(figures.rollout_stages.items()):
        stage.add_metric([rollout_id], index)
    progress = GaugeMetricFamily(
        "fedge_rollout_devices",
        "Devices of each rollout still going, per state.",
        labels=["rollout", "state"],
    )
    for (rollout_id, state), count in sorted(figures.rollout_devices.items()):
        progress.add_metric([rollout_id, state], count)

    families: list[Metric] = [online, total, models, rollouts, stage, progress]
    for key, name, documentation in _ROUND_FIGURES:
        family = GaugeMetricFamily(name, documentation, labels=["run", "round"])
        for row in figures.rounds:
            value = row.metrics.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                family.add_metric([row.run_id, str(row.round)], float(value))
        families.append(family)

    latency = GaugeMetricFamily(
        "fedge_fleet_latency_ms",
        "Fleet-wide inference latency over recent telemetry, ms.",
        labels=["quantile"],
    )
    for quantile, value in sorted(figures.latency_ms.items()):
        latency.add_metric([quantile], value)
    ingested = CounterMetricFamily(
        "fedge_telemetry_ingested", "Telemetry records stored since the coordinator started."
    )
    ingested.add_metric([], figures.telemetry_ingested)
    families.extend([latency, ingested, *_drift_families(figures)])
    return families


def _drift_families(figures: FleetMetrics) -> list[Metric]:
    psi = GaugeMetricFamily(
        "fedge_drift_psi",
        "Latest fleet-wide input drift per model version (largest feature PSI).",
        labels=["model", "version"],
    )
    for (model, version), value in sorted(figures.drift_psi.items()):
        psi.add_metric([model, str(version)], value)
    devices = GaugeMetricFamily(
        "fedge_drift_devices",
        "Devices per model version by the severity of their latest drift score.",
        labels=["model", "version", "severity"],
    )
    for (model, version, severity), count in sorted(figures.drift_devices.items()):
        devices.add_metric([model, str(version), severity], count)
    rejected = CounterMetricFamily(
        "fedge_drift_summaries_rejected",
        "Telemetry window summaries refused or not scored since start, by reason.",
        labels=["reason"],
    )
    for reason, count in sorted(figures.drift_rejected.items()):
        rejected.add_metric([reason], count)
    return [psi, devices, rejected]


class FleetCollector:
    """A Prometheus collector that asks the operations object at scrape time.

    Args:
        ops: Where the figures come from.
    """

    def __init__(self, ops: Operations) -> None:
        """Keep the operations object."""
        self._ops = ops

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must not call :meth:`Operations.metrics`."""
        return []

    def collect(self) -> Iterable[Metric]:
        """Gather the figures now.

        Raises:
            CoordinatorError: whatever ``ops.metrics()`` raises (the app maps it).
        """
        return metric_families(self._ops.metrics())


def new_registry(ops: Operations) -> CollectorRegistry:
    """A fresh registry holding only a :class:`FleetCollector` over ``ops``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(ops))
    return registry


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """Encode a registry for a scraper.

    Args:
        registry: What to expose.
        accept: The scraper's ``Accept`` header, or None.

    Returns:
        The body and its ``Content-Type``.
    """
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
