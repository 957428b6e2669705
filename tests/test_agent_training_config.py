"""The ``[training]`` section of the agent config: file, flags, defaults and errors."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import build_parser, config_from_args
from edge_agent.config.agent import (
    AgentConfig,
    TrainingConfig,
    build_config,
    example_config,
    load_config_file,
)
from edge_agent.config.sections import default_torch_threads
from edge_agent.errors import ConfigError

BASE = Path("/etc/fedge-agent")


def minimal(training: Any = None, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "device_id": "pi-1",
        "data_dir": "/var/lib/fedge-agent",
        "broker": {"url": "mqtt://localhost"},
        "trust": {"keys": ["/etc/fedge-agent/release.pub"]},
        **extra,
    }
    if training is not None:
        values["training"] = training
    return values


def build(
    values: dict[str, Any], overrides: dict[str, Any] | None = None, base: Path = BASE
) -> AgentConfig:
    return build_config(
        values,
        overrides or {},
        base_dir=base,
        file_label="agent.toml",
        override_labels={"training.data": "--train-data"},
    )


def config_error(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build(values, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- defaults


def test_defaults_without_a_training_section() -> None:
    training = build(minimal()).training
    assert training == TrainingConfig()
    assert training.data is None
    assert training.holdout_fraction == 0.2
    assert training.feedback_max_examples == 10_000
    assert training.prediction_log == 1024
    assert training.models == ()
    assert training.torch_threads == default_torch_threads()


def test_torch_threads_default_leaves_a_core_for_inference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for cpus, threads in ((8, 7), (2, 1), (1, 1), (None, 1)):
        monkeypatch.setattr("os.cpu_count", lambda cpus=cpus: cpus)
        assert default_torch_threads() == threads
        assert TrainingConfig().torch_threads == threads


def test_models_and_torch_threads_from_the_file() -> None:
    training = build(
        minimal(
            training={
                "models": ["mypkg.models:small_cnn", "zoo:sensor_cnn", " mypkg.models:small_cnn"],
                "torch_threads": 3,
            }
        )
    ).training
    # canonical (zoo: expanded, whitespace stripped), duplicates dropped, order kept
    assert training.models == ("mypkg.models:small_cnn", "edge_agent.training.zoo:sensor_cnn")
    assert training.torch_threads == 3


def test_an_empty_training_section_is_the_defaults() -> None:
    assert build(minimal(training={})).training == TrainingConfig()


def test_every_key_from_the_file() -> None:
    training = build(
        minimal(
            training={
                "data": "/srv/train",
                "holdout_fraction": 0.5,
                "feedback_max_examples": 0,
                "prediction_log": 7,
            }
        )
    ).training
    assert training.data == Path("/srv/train")
    assert training.holdout_fraction == 0.5
    assert training.feedback_max_examples == 0
    assert training.prediction_log == 7


@pytest.mark.parametrize(("given", "expected"), [(0, 0.0), (0.9, 0.9), (0.0, 0.0), (0.35, 0.35)])
def test_holdout_fraction_range_and_type(given: float, expected: float) -> None:
    fraction = build(minimal(training={"holdout_fraction": given})).training.holdout_fraction
    assert fraction == expected
    assert type(fraction) is float


@pytest.mark.parametrize("size", [1, 1_000_000])
def test_prediction_log_bounds_are_inclusive(size: int) -> None:
    assert build(minimal(training={"prediction_log": size})).training.prediction_log == size


# --------------------------------------------------------------------------- paths


def test_relative_data_resolves_against_the_file_directory(tmp_path: Path) -> None:
    base = tmp_path / "etc"
    config = build(minimal(training={"data": "train-data"}), base=base)
    assert config.training.data == base / "train-data"
    assert config.training.data.is_absolute()


def test_relative_data_in_a_real_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "conf" / "agent.toml"
    path.parent.mkdir()
    path.write_text(
        'device_id = "pi-1"\ndata_dir = "state"\n'
        '[broker]\nurl = "mqtt://localhost"\n'
        '[trust]\nkeys = ["k.pub"]\n'
        '[training]\ndata = "../datasets/local"\nholdout_fraction = 0.1\n'
    )
    monkeypatch.chdir(tmp_path)  # not the file's directory
    config = build_config(load_config_file(path), {}, base_dir=path.parent, file_label=str(path))
    assert config.training.data == path.parent / "../datasets/local"
    assert config.training.holdout_fraction == 0.1


def test_absolute_data_is_kept(tmp_path: Path) -> None:
    config = build(minimal(training={"data": str(tmp_path / "d")}), base=Path("/elsewhere"))
    assert config.training.data == tmp_path / "d"


def test_an_override_beats_the_file_and_resolves_against_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = build(
        minimal(training={"data": "from-file", "holdout_fraction": 0.3}),
        {"training": {"data": Path("from-flag")}},
    )
    assert config.training.data == tmp_path / "from-flag"
    assert config.training.holdout_fraction == 0.3  # the rest of the section stays


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("holdout_fraction", "0.2"),
        ("holdout_fraction", True),
        ("holdout_fraction", -0.1),
        ("holdout_fraction", 0.95),
        ("holdout_fraction", 1),
        ("holdout_fraction", math.nan),
        ("holdout_fraction", math.inf),
        ("feedback_max_examples", -1),
        ("feedback_max_examples", 10.0),
        ("feedback_max_examples", False),
        ("feedback_max_examples", "100"),
        ("prediction_log", 0),
        ("prediction_log", 1_000_001),
        ("prediction_log", 1.5),
        ("prediction_log", True),
        ("data", 5),
        ("data", ""),
        ("data", ["a", "b"]),
        ("data", True),
        ("models", "mypkg.models:small_cnn"),
        ("models", [5]),
        ("models", ["no-colon"]),
        ("models", ["mypkg.models:small_cnn:extra"]),
        ("models", ["zoo:resnet"]),
        ("torch_threads", 0),
        ("torch_threads", 2.0),
        ("torch_threads", True),
        ("torch_threads", "2"),
    ],
)
def test_bad_values_name_the_key_and_the_file(key: str, value: object) -> None:
    message = config_error(minimal(training={key: value}))
    assert message.startswith("agent.toml: ")
    assert f"training.{key}" in message


def test_bad_override_names_the_flag() -> None:
    message = config_error(minimal(), {"training": {"data": ""}})
    assert message.startswith("--train-data: ")
    assert "training.data" in message


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("holdout", "did you mean training.holdout_fraction?"),
        ("prediction_logs", "did you mean training.prediction_log?"),
        ("feedback_max_example", "did you mean training.feedback_max_examples?"),
        ("dat", "did you mean training.data?"),
    ],
)
def test_unknown_training_key_gets_a_hint(key: str, hint: str) -> None:
    message = config_error(minimal(training={key: 1}))
    assert f"unknown key training.{key}" in message
    assert hint in message


def test_unknown_training_key_without_a_close_match_lists_the_known_ones() -> None:
    message = config_error(minimal(training={"zzzzzz": 1}))
    assert "unknown key training.zzzzzz" in message
    for key in ("data", "holdout_fraction", "feedback_max_examples", "prediction_log", "models"):
        assert f"training.{key}" in message


def test_a_training_key_at_the_top_level_is_pointed_to_its_section() -> None:
    values = minimal()
    values["holdout_fraction"] = 0.3
    message = config_error(values)
    assert "did you mean training.holdout_fraction?" in message
    assert "[training]" in message


def test_a_top_level_key_under_training_is_pointed_back() -> None:
    message = config_error(minimal(training={"data_dir": "/x"}))
    assert "did you mean data_dir? move it above the first [section] header" in message


def test_training_must_be_a_table() -> None:
    message = config_error(minimal(training="data"))
    assert "[training] must be a table" in message


def test_training_config_refuses_non_path_data_directly() -> None:
    with pytest.raises(ConfigError, match=re.escape("training.data must be a path")):
        TrainingConfig(data="/srv/train")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the CLI flag


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "agent.toml"
    path.parent.mkdir()
    path.write_text(
        """\
device_id = "pi-file"
data_dir = "state"

[broker]
url = "mqtt://broker.local"

[trust]
keys = ["release.pub"]

[training]
data = "file-data"
holdout_fraction = 0.25
"""
    )
    return path


def run_args(*argv: str | Path) -> Any:
    return build_parser().parse_args(["run", *map(str, argv)])


def test_file_data_without_the_flag(config_file: Path) -> None:
    config = config_from_args(run_args("--config", config_file), {})
    assert config.training.data == config_file.parent / "file-data"
    assert config.training.holdout_fraction == 0.25


def test_train_data_flag_overrides_the_file(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = config_from_args(run_args("--config", config_file, "--train-data", "mine"), {})
    assert config.training.data == work / "mine"
    assert config.training.holdout_fraction == 0.25
    absolute = tmp_path / "abs"
    config = config_from_args(run_args("--config", config_file, "--train-data", absolute), {})
    assert config.training.data == absolute


def test_train_data_flag_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = run_args(
        "--device-id", "pi-flags", "--broker", "mqtt://b", "--data-dir", "state",
        "--trust", "k.pub", "--train-data", "data",
    )  # fmt: skip
    config = config_from_args(args, {})
    assert config.training.data == tmp_path / "data"
    assert config.training.holdout_fraction == TrainingConfig().holdout_fraction


def test_bad_training_value_in_the_file_names_the_file(config_file: Path) -> None:
    config_file.write_text(config_file.read_text().replace("0.25", "2.5"))
    with pytest.raises(ConfigError) as info:
        config_from_args(run_args("--config", config_file), {})
    assert str(info.value).startswith(f"{config_file}: ")
    assert "training.holdout_fraction" in str(info.value)


# --------------------------------------------------------------------------- the example


def test_example_config_still_builds_with_the_documented_training_defaults() -> None:
    values = tomllib.loads(example_config())
    assert set(values["training"]) == {
        "holdout_fraction",
        "feedback_max_examples",
        "prediction_log",
    }
    config = build_config(values, {}, base_dir=Path("/"), file_label="example")
    assert config.training == TrainingConfig()


def test_example_config_data_line_uncommented_builds() -> None:
    text = example_config().replace(
        '# data = "/var/lib/fedge-agent/training-data"',
        'data = "/var/lib/fedge-agent/training-data"',
    )
    assert text != example_config()
    config = build_config(tomllib.loads(text), {}, base_dir=Path("/"), file_label="example")
    assert config.training.data == Path("/var/lib/fedge-agent/training-data")


def test_example_config_documents_every_training_key() -> None:
    section = example_config().partition("[training]")[2]
    for key in (
        "data",
        "holdout_fraction",
        "feedback_max_examples",
        "prediction_log",
        "models",
        "torch_threads",
    ):
        assert re.search(rf"^#? ?{key} = ", section, re.MULTILINE), key


def test_example_config_models_line_uncommented_builds() -> None:
    text = (
        example_config()
        .replace("# models = ", "models = ")
        .replace("# torch_threads = ", "torch_threads = ")
    )
    config = build_config(tomllib.loads(text), {}, base_dir=Path("/"), file_label="example")
    assert config.training.models == ("mypkg.models:small_cnn",)
    assert config.training.torch_threads == 2
