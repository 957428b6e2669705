"""Benchmark: the "must show" figures of issue 16, real data from federated to deployed.

Four workloads, each on a real dataset that a public package ships (no synthetic data),
each run from data to a model answering over HTTP on real agent processes:

=========== ============================ ====================== ==========================
workload    model                        dataset                partition
=========== ============================ ====================== ==========================
images      ``zoo:small_cnn`` (and the   ``digits-images``      ``dirichlet:0.5``
            built-in ``mlp``)            (``mnist`` too with
                                         ``--mnist``)
sensor      ``zoo:sensor_cnn``           ``japanese-vowels``    ``dirichlet:0.5``
anomaly     ``zoo:dense_autoencoder``    ``ucr-anomaly``        ``iid``
regression  ``zoo:mlp_regressor``        ``diabetes``           ``iid``
=========== ============================ ====================== ==========================

For each workload the script:

1. starts a mosquitto broker (loopback, the shipped ACL, one password per MQTT user);
2. runs :func:`coordinator.sim.simulate.run_simulation` through it: one in-process
   agent per shard with its own MQTT connection, the rounds, the centralized baseline
   (the same model trained on the union of the shards with the same epoch budget), the
   int8 packaging gate and a signed artifact (``report.json``); for ``images`` it runs
   the built-in MLP on the same dataset, split and seed as well;
3. starts :data:`EDGE_DEVICES` separate ``fedge-agent run`` processes (local HTTP
   endpoint on a loopback port each), trusting the simulation's throwaway key, and
   deploys the artifact to them with :class:`~coordinator.delivery.deliveries.Deliveries`
   over the same broker; waits until each one's ``GET /v1/model`` names the version;
4. sends the coordinator's test set (``<out>/data/test.npz``) through every device's
   ``POST /v1/predict`` (batches under the request size limit), computes the deployed
   metric from the answers (accuracy, MSE, or the ROC-AUC of the anomaly score against
   the anomaly flags) and compares the answers with the fp32 torch model's outputs
   (:class:`~edge_agent.training.torch_trainer.TorchTrainer` ``.predict`` on the final
   global weights): the packaging gate (accuracy points, relative MSE increase, AUC
   drop) and the largest absolute output difference;
5. checks the issue's gates (:func:`issue_gates`) and reports every one, passed or not.

It prints a table, writes JSON (``--out``; a run with ``--only`` replaces just that
workload's entry in an existing file) and writes or replaces the "Real models (issue
16)" section of ``docs/benchmarks.md`` (the rest of that file is left as it is)::

    python benchmarks/real_models.py [--only images|sensor|anomaly|regression] [--mnist]
                                     [--out benchmarks/results/real_models.json]

Exit status 0 when every gate of the workloads run passed, 1 otherwise (a workload that
did not finish fails its gates).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from _support import (
    DOCS,
    argument_parser,
    environment,
    free_port,
    mosquitto,
    password,
    stop_process,
    timestamp,
    wait_until,
    write_doc_section,
    write_json,
)

from compress.metrics import mean_squared_error, roc_auc
from compress.torch_export import OUTPUT_NAMES
from coordinator.delivery.deliveries import Artifact, Deliveries
from coordinator.delivery.torch_packaging import package_torch
from coordinator.delivery.tracker import DeviceState
from coordinator.link.fleet import Target
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.sim.simulate import SimulationConfig, SimulationReport, run_simulation
from edge_agent.config.agent import BrokerConfig
from edge_agent.serving.http_api import MAX_BODY_BYTES

DEFAULT_OUT = Path(__file__).parent / "results" / "real_models.json"
SECTION_HEADING = "## Real models (issue 16)"
EDGE_DEVICES = 3
"""Separate ``fedge-agent run`` processes the artifact is deployed to."""
DEVICE_PREFIX = "edge"
COORDINATOR = "coordinator"
STARTUP_TIMEOUT_S = 60.0
DEPLOY_TIMEOUT_S = 180.0
HTTP_TIMEOUT_S = 60.0
ROUND_TIMEOUT_S = 600.0
BODY_SHARE = 0.8
"""Share of the agent's request size limit one predict request may use."""
KINDS = ("images", "sensor", "anomaly", "regression")
TORCH_THREADS = 1
"""torch threads in this process (see :func:`main`)."""

logger = logging.getLogger("real_models")


# ------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """One federated run and what it is judged on (``kind``: one of :data:`KINDS`)."""

    name: str
    kind: str
    dataset: str
    model: str
    partition: str
    agents: int
    rounds: int
    epochs: int
    lr: float
    batch_size: int = 16
    optimizer: str = "sgd"
    mlp_baseline: bool = False
    note: str = ""

    def simulation(
        self, out: Path, broker: str, seed: int, *, model: str | None = None
    ) -> SimulationConfig:
        """The :class:`SimulationConfig` of this workload (``model`` replaces its model)."""
        builtin = model is not None
        return SimulationConfig(
            out=out,
            agents=self.agents,
            rounds=self.rounds,
            dataset=self.dataset,
            partition=self.partition,
            broker=broker,
            broker_password_format="pw-{user}",  # _support.password
            seed=seed,
            epochs=self.epochs,
            # the built-in MLP keeps simulate's own defaults (lr 0.05, SGD)
            lr=0.05 if builtin else self.lr,
            batch_size=self.batch_size,
            round_timeout_s=ROUND_TIMEOUT_S,
            model=model if builtin else self.model,
            optimizer="sgd" if builtin else self.optimizer,
        )


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="images",
            kind="images",
            dataset="digits-images",
            model="zoo:small_cnn",
            partition="dirichlet:0.5",
            agents=10,
            rounds=20,
            epochs=2,
            lr=0.05,
            mlp_baseline=True,
            note="sklearn's digits as 1x8x8 images",
        ),
        Workload(
            name="images-mnist",
            kind="images",
            dataset="mnist",
            model="zoo:small_cnn",
            partition="dirichlet:0.5",
            agents=10,
            rounds=20,
            epochs=2,
            lr=0.01,
            mlp_baseline=True,
            note=(
                "the 5,000-image MNIST sample as 1x28x28 images; lr 0.01, as 0.05 makes the "
                "centralized CNN oscillate (0.91-0.97 between epochs)"
            ),
        ),
        Workload(
            name="sensor",
            kind="sensor",
            dataset="japanese-vowels",
            model="zoo:sensor_cnn",
            partition="dirichlet:0.5",
            agents=10,
            rounds=40,
            epochs=2,
            lr=0.05,
            note=(
                "not one agent per speaker: the class IS the speaker, so that split would "
                "give every agent a single class; Dirichlet(0.5) over the speakers instead"
            ),
        ),
        Workload(
            name="anomaly",
            kind="anomaly",
            dataset="ucr-anomaly",
            model="zoo:dense_autoencoder",
            partition="iid",
            agents=10,
            rounds=30,
            epochs=5,
            lr=0.003,
            optimizer="adam",
            note=(
                "trained on normal windows only (about 285 windows of 64 steps, about 28 per "
                "agent); the test windows carry anomaly flags"
            ),
        ),
        Workload(
            name="regression",
            kind="regression",
            dataset="diabetes",
            model="zoo:mlp_regressor",
            partition="iid",
            agents=10,
            rounds=10,
            epochs=1,
            lr=0.003,
            optimizer="adam",
            note=(
                "442 patients, about 31 training rows per agent; a small epoch budget, as a "
                "larger one overfits (the centralized model's test MSE rises with it)"
            ),
        ),
    )
}


def selected(only: str | None, mnist: bool) -> list[Workload]:
    """The workloads to run: one kind (``--only``) or all; MNIST only with ``--mnist``."""
    if only is not None and only not in KINDS:
        raise SystemExit(f"--only must be one of {', '.join(KINDS)}, got {only!r}")
    return [
        w
        for w in WORKLOADS.values()
        if (only is None or w.kind == only) and (mnist or w.dataset != "mnist")
    ]


# ------------------------------------------------------------------- metrics and gates


@dataclass(frozen=True)
class Gate:
    """One pass/fail check: the ``quantity`` measured (``value``) must be ``op`` ``limit``
    (``op``: ``"<="`` or ``">"``); an unknown value fails."""

    name: str
    quantity: str
    value: float | None
    op: str
    limit: float
    passed: bool


def _at_most(name: str, quantity: str, value: float | None, limit: float) -> Gate:
    """Passes when ``value`` is known and at most ``limit``."""
    passed = value is not None and math.isfinite(value) and value <= limit
    return Gate(name, quantity, value, "<=", limit, passed)


def _above(name: str, quantity: str, value: float | None, limit: float) -> Gate:
    """Passes when ``value`` is known and strictly above ``limit``."""
    passed = value is not None and math.isfinite(value) and value > limit
    return Gate(name, quantity, value, ">", limit, passed)


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def task_metric(task: str, outputs: npt.NDArray[Any], y: npt.NDArray[Any]) -> tuple[str, float]:
    """The task's primary metric of model ``outputs`` against the test set's ``y``.

    classification: accuracy of the argmax over class probabilities; regression: mean
    squared error; reconstruction: ROC-AUC of the anomaly score against the 0/1 flags.
    """
    if task == "classification":
        if outputs.ndim != 2 or len(outputs) != len(y):
            raise ValueError(f"class probabilities must be (n, classes), got {outputs.shape}")
        return "accuracy", float(np.mean(np.argmax(outputs, axis=1) == y))
    if task == "regression":
        predictions = outputs.reshape(y.shape) if outputs.size == y.size else outputs
        return "mse", float(mean_squared_error(predictions, y))
    if task == "reconstruction":
        return "auc", float(roc_auc(outputs.reshape(-1), y.reshape(-1)))
    raise ValueError(f"unknown task {task!r}")


def deployment_gate(
    task: str, fp32_metric: float, deployed_metric: float, limits: Mapping[str, float]
) -> Gate:
    """The packaging gate applied to the deployed answers against the fp32 model."""
    if task == "classification":
        limit = limits["max_accuracy_drop"]
        drop = 100.0 * (fp32_metric - deployed_metric)
        return _at_most("deployed vs fp32", "accuracy drop (points)", drop, limit)
    if task == "regression":
        limit = limits["max_error_increase"]
        increase = (deployed_metric - fp32_metric) / fp32_metric if fp32_metric > 0 else None
        return _at_most("deployed vs fp32", "relative MSE increase", increase, limit)
    limit = limits["max_auc_drop"]
    return _at_most("deployed vs fp32", "AUC drop", fp32_metric - deployed_metric, limit)


def issue_gates(
    kind: str,
    final: Mapping[str, float],
    central: Mapping[str, float],
    *,
    deployed: float | None = None,
    mlp_accuracy: float | None = None,
) -> list[Gate]:
    """The "must show" gates of issue 16 for one workload.

    Args:
        kind: One of :data:`KINDS`.
        final: Metrics of the final federated (fp32) global model on the test set.
        central: The same metrics of the model trained centrally.
        deployed: The anomaly workload's ROC-AUC of the deployed int8 model's answers.
        mlp_accuracy: The built-in MLP's federated accuracy (images).

    One-sided: a federated model that beats the centralized one passes.
    """
    if kind == "images":
        fed = final.get("accuracy")
        return [
            _at_most("within 3 points of centralized", "centralized - federated accuracy",
                     _difference(central.get("accuracy"), fed), 0.03),
            _above("above the built-in MLP", "CNN - MLP federated accuracy",
                   _difference(fed, mlp_accuracy), 0.0),
        ]  # fmt: skip
    if kind == "sensor":
        return [
            _at_most("within 5 points of centralized", "centralized - federated accuracy",
                     _difference(central.get("accuracy"), final.get("accuracy")), 0.05),
        ]  # fmt: skip
    if kind == "anomaly":
        return [
            _at_most("deployed AUC within 0.05 of centralized",
                     "centralized AUC - deployed int8 AUC",
                     _difference(central.get("auc"), deployed), 0.05),
        ]  # fmt: skip
    if kind == "regression":
        fed, base = final.get("mse"), central.get("mse")
        ratio = None if fed is None or not base else fed / base - 1.0
        return [_at_most("MSE within 10 % of centralized", "federated / centralized MSE - 1",
                         ratio, 0.10)]  # fmt: skip
    raise ValueError(f"unknown workload kind {kind!r}")


def packaging_limits() -> dict[str, float]:
    """The limits :func:`package_torch` gates int8 against fp32 with, by default.

    Read from its signature so that the harness judges deployed answers exactly as the
    packaging step judged the artifact (one definition of the thresholds).
    """
    params = inspect.signature(package_torch).parameters
    names = ("max_accuracy_drop", "max_error_increase", "max_auc_drop")
    return {name: float(params[name].default) for name in names}


# ------------------------------------------------------------------- HTTP


def request_json(url: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """GET (``body`` None) or POST JSON; the decoded answer (HTTPError on a status >= 400)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def request_batches(x: npt.NDArray[np.float32], max_body: int) -> list[slice]:
    """Slices of ``x`` whose ``{"inputs": ...}`` bodies stay under ``max_body`` bytes.

    Sized from the longest encoded example (float32 values written exactly), so every
    request fits whatever the values.
    """
    if len(x) == 0:
        return []
    longest = max(len(json.dumps(row.tolist())) + 2 for row in x)
    rows = int((max_body - len('{"inputs": []}')) // longest)
    if rows < 1:
        raise ValueError(f"one example takes {longest} bytes, over the {max_body} byte limit")
    return [slice(start, min(start + rows, len(x))) for start in range(0, len(x), rows)]


def predict_over_http(
    port: int, x: npt.NDArray[np.float32], output: str
) -> tuple[npt.NDArray[np.float64], int]:
    """The ``output`` of the model a device serves, for every example of ``x``.

    Returns:
        The outputs stacked in order, and the number of requests sent.
    """
    url = f"http://127.0.0.1:{port}/v1/predict"
    parts = []
    batches = request_batches(x, int(MAX_BODY_BYTES * BODY_SHARE))
    for part in batches:
        answer = request_json(url, {"inputs": x[part].tolist()})
        if output not in answer["outputs"]:
            raise RuntimeError(f"no output {output!r} in the answer: {sorted(answer['outputs'])}")
        parts.append(np.asarray(answer["outputs"][output], dtype=np.float64))
    return np.concatenate(parts), len(batches)


# ------------------------------------------------------------------- edge devices


@dataclass
class EdgeDevice:
    """A ``fedge-agent run`` process with its HTTP endpoint on a loopback port."""

    device_id: str
    http_port: int
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        """The end of its log."""
        return self.log.read_text(errors="replace")[-2000:]


def broker_config(port: int, user: str) -> BrokerConfig:
    """Connection settings for ``user`` on the script's broker."""
    return BrokerConfig(
        host="127.0.0.1", port=port, tls=False, username=user, password=password(user),
        reconnect_min_s=1.0, reconnect_max_s=2.0,
    )  # fmt: skip


def device_ids() -> list[str]:
    """The MQTT users of the edge devices."""
    return [f"{DEVICE_PREFIX}{i:02d}" for i in range(EDGE_DEVICES)]


@contextlib.contextmanager
def edge_devices(port: int, trust: Path, workdir: Path) -> Iterator[list[EdgeDevice]]:
    """Start :data:`EDGE_DEVICES` agent processes on the broker at ``port``; stop them after."""
    devices: list[EdgeDevice] = []
    try:
        for device_id in device_ids():
            data_dir = workdir / device_id
            data_dir.mkdir(parents=True, exist_ok=True)
            secret = workdir / f"{device_id}.password"
            secret.write_text(password(device_id))
            http_port = free_port()
            log = workdir / f"{device_id}.log"
            args = [
                sys.executable, "-m", "edge_agent.cli", "run",
                "--device-id", device_id, "--broker", f"mqtt://127.0.0.1:{port}",
                "--password-file", str(secret), "--trust", str(trust),
                "--data-dir", str(data_dir), "--http", f"127.0.0.1:{http_port}",
                "--telemetry-interval", "5",
            ]  # fmt: skip
            with log.open("ab") as sink:
                process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
            devices.append(EdgeDevice(device_id, http_port, process, log))
        yield devices
    finally:
        for device in devices:
            stop_process(device.process)


def deploy(artifact_path: Path, port: int, devices: Sequence[EdgeDevice]) -> dict[str, Any]:
    """Deploy the artifact to ``devices`` over MQTT; wait until each one serves it.

    Returns:
        Seconds from deploy to installed, and each device's outcome.

    Raises:
        RuntimeError: a device exited, did not install, or does not serve the version.
    """
    artifact = Artifact.load(artifact_path)
    version = artifact.manifest.version
    ids = [d.device_id for d in devices]
    hub = MqttHub(HubConfig(broker=broker_config(port, COORDINATOR)))
    hub.start(timeout=30.0)
    try:
        with Deliveries(hub, accept_wait_s=10.0) as deliveries:

            def online() -> bool:
                for device in devices:
                    if device.process.poll() is not None:
                        raise RuntimeError(f"{device.device_id} exited: {device.tail()}")
                up = {r.device_id for r in hub.fleet() if r.online}
                return all(i in up for i in ids)

            wait_until(online, STARTUP_TIMEOUT_S, "the edge devices to come online")
            started = time.monotonic()
            delivery = deliveries.deploy(artifact, Target.parse("device:" + ",".join(ids)))
            result = deliveries.wait(delivery, timeout=DEPLOY_TIMEOUT_S)
            seconds = time.monotonic() - started
    finally:
        hub.stop()
    states = {d.device_id: d.state for d in result.devices}
    failed = {i: str(s) for i, s in states.items() if s is not DeviceState.INSTALLED}
    if failed:
        raise RuntimeError(f"the artifact did not install: {failed}; {result.to_json()}")

    def serving(device: EdgeDevice) -> bool:
        try:
            info = request_json(f"http://127.0.0.1:{device.http_port}/v1/model")
        except (urllib.error.URLError, OSError):
            return False
        return bool(info.get("version") == version and info.get("name") == artifact.manifest.name)

    for device in devices:
        wait_until(lambda d=device: serving(d), STARTUP_TIMEOUT_S, f"{device.device_id} to serve")
    return {
        "devices": ids,
        "version": version,
        "artifact_bytes": len(artifact.payload),
        "deploy_to_installed_s": round(seconds, 3),
        "states": {i: s.value for i, s in states.items()},
    }


# ------------------------------------------------------------------- one workload


def load_test_set(out: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[Any]]:
    """The coordinator's test set the simulation wrote: x and y (labels/targets/flags)."""
    with np.load(out / "data" / "test.npz") as arrays:
        return arrays["x"].astype(np.float32), arrays["y"]


def load_weights(path: Path) -> dict[str, npt.NDArray[np.float32]]:
    """The final global weights (named arrays, in their stored order)."""
    with np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}


def fp32_outputs(sim: SimulationReport, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """What the fp32 torch model outputs for ``x``: the final global weights as written to
    ``report.json``'s ``weights``, in the trainer the simulation's agents built."""
    weights = load_weights(Path(sim.to_json()["weights"]))
    return np.asarray(sim.model.trainer().predict(weights, x), dtype=np.float64)


def check_deployment(
    sim: SimulationReport, port: int, limits: Mapping[str, float]
) -> dict[str, Any]:
    """Deploy the run's artifact to the edge devices and judge their answers."""
    out, task = sim.config.out, sim.model.model.task
    x, y = load_test_set(out)
    with edge_devices(port, out / "keys" / "signing.pub", out / "edge") as devices:
        delivery = deploy(Path(sim.artifact), port, devices)
        answers, requests = {}, 0
        started = time.monotonic()
        for device in devices:
            answers[device.device_id], sent = predict_over_http(
                device.http_port, x, OUTPUT_NAMES[task]
            )
            requests += sent
        predict_s = time.monotonic() - started
    reference = fp32_outputs(sim, x)
    metric, fp32_metric = task_metric(task, reference, y)
    per_device = {i: task_metric(task, a, y)[1] for i, a in answers.items()}
    first = answers[devices[0].device_id]
    deployed_metric = per_device[devices[0].device_id]
    differences = [float(np.max(np.abs(a.reshape(reference.shape) - reference)))
                   for a in answers.values()]  # fmt: skip
    gate = deployment_gate(task, fp32_metric, deployed_metric, limits)
    return {
        **delivery,
        "test_examples": len(x),
        "requests": requests,
        "predict_s": round(predict_s, 3),
        "metric": metric,
        "fp32_metric": fp32_metric,
        "deployed_metric": deployed_metric,
        "deployed_metric_per_device": per_device,
        "devices_agree": all(np.array_equal(a, first) for a in answers.values()),
        "max_abs_output_difference": max(differences),
        "gate": asdict(gate),
    }


@dataclass
class Outcome:
    """What one workload measured (``error`` set when it did not finish)."""

    workload: Workload
    settings: dict[str, Any] = field(default_factory=dict)
    federated: dict[str, Any] = field(default_factory=dict)
    mlp: dict[str, Any] | None = None
    deployment: dict[str, Any] | None = None
    gates: list[Gate] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    started: str = field(default_factory=timestamp)

    def to_json(self) -> dict[str, Any]:
        """JSON-able, with the measuring command and time."""
        return {
            "workload": asdict(self.workload),
            "settings": self.settings,
            "federated": self.federated,
            "mlp": self.mlp,
            "deployment": self.deployment,
            "gates": [asdict(g) for g in self.gates],
            "passed": self.error is None and all(g.passed for g in self.gates),
            "did_not_finish": self.error,
            "seconds": round(self.seconds, 1),
            "measured": {"timestamp": self.started, "command": shlex.join(sys.orig_argv)},
        }


def _summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The figures kept from a simulation's report.json."""
    keys = ("model", "task", "metric", "final_metrics", "centralized_metrics",
            "final_accuracy", "centralized_accuracy", "seconds_per_round", "rounds_ok",
            "rounds_failed", "packaging", "artifact", "weights", "data", "timings",
            "uplink_bytes_per_round")  # fmt: skip
    summary = {k: report.get(k) for k in keys}
    summary["agents_updated"] = report.get("rollout", {}).get("agents_updated")
    return summary


def run_workload(workload: Workload, root: Path, seed: int) -> Outcome:
    """Simulate, deploy, predict, judge (see the module docstring); never raises."""
    outcome = Outcome(workload)
    started = time.monotonic()
    directory = root / workload.name
    sims = [f"sim{i:02d}" for i in range(workload.agents)]
    try:
        limits = packaging_limits()
        with mosquitto(directory / "broker", users=[COORDINATOR, *sims, *device_ids()],
                       timeout=10) as port:  # fmt: skip
            url = f"mqtt://127.0.0.1:{port}"
            config = workload.simulation(directory / "fedge", url, seed)
            outcome.settings = config.to_json()
            print(f"{workload.name}: federating {workload.model} on {workload.dataset}...",
                  file=sys.stderr)  # fmt: skip
            sim = run_simulation(config)
            report = sim.to_json()
            outcome.federated = _summary(report)
            if workload.mlp_baseline:
                print(f"{workload.name}: the built-in MLP on the same split...", file=sys.stderr)
                mlp = workload.simulation(directory / "mlp", url, seed, model="mlp")
                outcome.mlp = {"settings": mlp.to_json(), **_summary(run_simulation(mlp).to_json())}
            print(f"{workload.name}: deploying to {EDGE_DEVICES} agent processes...",
                  file=sys.stderr)  # fmt: skip
            outcome.deployment = check_deployment(sim, port, limits)
        deployed = outcome.deployment["deployed_metric"]
        outcome.gates = [
            *issue_gates(
                workload.kind, report.get("final_metrics") or {},
                report.get("centralized_metrics") or {},
                deployed=deployed,
                mlp_accuracy=None if outcome.mlp is None else outcome.mlp.get("final_accuracy"),
            ),
            Gate(**outcome.deployment["gate"]),
        ]  # fmt: skip
    except Exception as exc:  # reported as "did not finish", never hidden
        logger.debug("workload %s failed", workload.name, exc_info=True)
        outcome.error = f"{type(exc).__name__}: {exc}"[:600]
        print(traceback.format_exc(), file=sys.stderr)
    outcome.seconds = time.monotonic() - started
    return outcome


# ------------------------------------------------------------------- output


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _row(entry: Mapping[str, Any]) -> dict[str, str]:
    """One workload's figures as table cells."""
    w, fed, dep = entry["workload"], entry["federated"] or {}, entry["deployment"] or {}
    metric = fed.get("metric") or dep.get("metric") or "-"
    final = (fed.get("final_metrics") or {}).get(metric)
    central = (fed.get("centralized_metrics") or {}).get(metric)
    mlp = (entry.get("mlp") or {}).get("final_accuracy")
    gates = entry["gates"]
    verdict = "did not finish" if entry["did_not_finish"] else (
        f"{sum(g['passed'] for g in gates)}/{len(gates)} passed")  # fmt: skip
    return {
        "workload": w["name"],
        "model": w["model"],
        "dataset": w["dataset"],
        "agents": str(w["agents"]),
        "rounds x epochs": f"{w['rounds']} x {w['epochs']}",
        "metric": metric,
        "federated": _fmt(final),
        "centralized": _fmt(central),
        "built-in MLP": _fmt(mlp),
        "fp32 (torch)": _fmt(dep.get("fp32_metric")),
        "deployed int8": _fmt(dep.get("deployed_metric")),
        "max abs diff": _fmt(dep.get("max_abs_output_difference"), ".2e"),
        "gates": verdict,
    }


def format_table(entries: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of the workloads, then one line per gate."""
    rows = [_row(e) for e in entries]
    if not rows:
        return "(no workloads)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(r[c].rjust(widths[c]) for c in columns) for r in rows]
    for entry in entries:
        for gate in entry["gates"]:
            lines.append(_gate_line(entry["workload"]["name"], gate))
        if entry["did_not_finish"]:
            lines.append(f"{entry['workload']['name']}: DID NOT FINISH: {entry['did_not_finish']}")
    return "\n".join(lines)


def _gate_line(workload: str, gate: Mapping[str, Any], *, bold: bool = False) -> str:
    verdict = "PASS" if gate["passed"] else "FAIL"
    verdict = f"**{verdict}**" if bold else verdict
    return (f"{workload}: {verdict} {gate['name']}: {gate['quantity']} = "
            f"{_fmt(gate['value'])} (must be {gate['op']} {_fmt(gate['limit'])})")  # fmt: skip


def docs_section(result: Mapping[str, Any]) -> str:
    """The "Real models (issue 16)" section of docs/benchmarks.md, from the JSON."""
    entries = list(result["workloads"].values())
    env = result["environment"]
    rows = [_row(e) for e in entries]
    body = [
        SECTION_HEADING,
        "",
        "Generated by `benchmarks/real_models.py` "
        f"({env['platform']}, {env['cpu_count']} CPUs, Python {env['python']}, "
        f"torch {env['packages'].get('torch')}, onnxruntime "
        f"{env['packages'].get('onnxruntime')}, {env['mosquitto']}; load average "
        f"{', '.join(str(x) for x in env['loadavg_1_5_15'])} when it finished). Real data "
        "that public packages ship, federated through `fedge simulate` over a mosquitto "
        "broker (shipped ACL, one password per device), packaged as a signed int8 ONNX "
        f"artifact, deployed over MQTT to {EDGE_DEVICES} separate `fedge-agent run` processes "
        "and asked for the whole test set over their HTTP `/v1/predict`. *federated*: the "
        "final global model (fp32) on the test set; *centralized*: the same model trained on "
        "the union of the shards with the same epoch budget; *deployed int8*: the metric of "
        "the devices' answers; *max abs diff*: the largest difference between a device's "
        "answer and the fp32 torch model's output (probabilities, predictions or anomaly "
        "scores). Every agent keeps 20 % of its shard out of training (its own evaluation "
        "data, the agents' default), so the federated model trains on 80 % of the examples "
        "the centralized one sees. torch runs on one thread in the simulation process (the "
        "agents' setting), which keeps the centralized baseline reproducible.",
        "",
    ]
    if rows:
        columns = list(rows[0])
        body += [
            "| " + " | ".join(columns) + " |",
            "|" + "|".join("---" if i < 3 else "---:" for i in range(len(columns))) + "|",
        ]
        body += ["| " + " | ".join(r[c].replace("|", "/") for c in columns) + " |"
                 for r in rows]  # fmt: skip
    body += ["", "Gates (issue 16 \"Must show\", and the packaging gate on the deployed "
             "answers):", ""]  # fmt: skip
    for entry in entries:
        name = entry["workload"]["name"]
        if entry["did_not_finish"]:
            body.append(f"* **{name}: did not finish**: {entry['did_not_finish']}")
        body += [f"* {_gate_line(name, gate, bold=True)}" for gate in entry["gates"]]
    body += ["", "Settings and notes:", ""]
    for entry in entries:
        w, s = entry["workload"], entry["settings"]
        body.append(
            f"* **{w['name']}**: `{w['model']}` on `{w['dataset']}`, partition "
            f"`{w['partition']}` over {w['agents']} agents, {w['rounds']} rounds x "
            f"{w['epochs']} local epochs, {w['optimizer']} lr {w['lr']}, batch "
            f"{w['batch_size']}, seed {s.get('seed', '-')}; {_timing(entry)}. "
            f"{w['note'][:1].upper()}{w['note'][1:]}."
        )
        body.append(f"  Command: `{entry['measured']['command']}` "
                    f"({entry['measured']['timestamp']}).")  # fmt: skip
    body += ["", "Raw figures: `benchmarks/results/real_models.json`.", ""]
    return "\n".join(body)


def _timing(entry: Mapping[str, Any]) -> str:
    """Seconds per round, the deploy and the workload, and what the devices answered."""
    fed, dep = entry["federated"] or {}, entry["deployment"] or {}
    parts = []
    if fed.get("seconds_per_round") is not None:
        parts.append(f"{fed['seconds_per_round']:.2f} s per round")
    if dep:
        agree = "identical" if dep.get("devices_agree") else "NOT identical"
        parts.append(
            f"artifact {dep['artifact_bytes'] / 1024:.1f} KiB installed on {len(dep['devices'])} "
            f"devices in {dep['deploy_to_installed_s']:.2f} s, {dep['test_examples']} test "
            f"examples in {dep['requests']} requests, answers {agree} across devices"
        )
    parts.append(f"{entry['seconds']:.0f} s in all")
    return ", ".join(parts)


def merge_results(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """``new``'s workloads over ``previous``'s (a ``--only`` run keeps the others)."""
    kept = dict(previous.get("workloads", {})) if previous else {}
    kept.update(new["workloads"])
    order = [name for name in WORKLOADS if name in kept] + [n for n in kept if n not in WORKLOADS]
    return {**new, "workloads": {name: kept[name] for name in order}}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--only", choices=KINDS, help="run one workload (default: all)")
    parser.add_argument("--mnist", action="store_true", help="images on MNIST as well")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # The in-process agents each set torch's (process-wide) thread count for a training
    # and restore it after, concurrently: what it is left at is a race, and the
    # centralized baseline, trained afterwards in this process, would run on 1 or 2
    # threads and give different figures from run to run. One thread, as the agents use.
    torch.set_num_threads(TORCH_THREADS)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="fedge-real-models-") as tmp:
        for workload in selected(args.only, args.mnist):
            outcome = run_workload(workload, Path(tmp), args.seed)
            outcomes.append(outcome)
            print(format_table([outcome.to_json()]), file=sys.stderr)
    entries = {o.workload.name: o.to_json() for o in outcomes}
    print(format_table(list(entries.values())))
    new = {
        "benchmark": "real_models",
        "timestamp": timestamp(),
        "workloads": entries,
        "environment": environment(["fedge", "torch", "onnxruntime", "numpy", "paho-mqtt"]),
        "torch_threads": TORCH_THREADS,
    }
    previous = json.loads(args.out.read_text()) if args.out.exists() else None
    result = merge_results(previous, new)
    write_json(args.out, result)
    if not args.no_docs:
        write_doc_section(DOCS, docs_section(result))
    return 0 if all(e["passed"] for e in entries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
