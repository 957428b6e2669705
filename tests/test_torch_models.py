"""edge_agent.training.torch_models: model args, building a factory's module, the weights layout."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edge_agent.errors import (
    TorchUnavailableError,
    TrainConfigError,
    TrainingError,
    UnknownModelError,
)
from edge_agent.training.model_spec import ModelSpec, parse_model_spec
from edge_agent.training.torch_models import (
    build_module,
    factory_task,
    initial_weights,
    load_module_weights,
    model_args_of,
    module_weights,
    parse_model_args,
)

HERE = "tests.test_torch_models"
_counter = itertools.count()


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ------------------------------------------------------------------ test factories


def bn_net(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """A conv net with BatchNorm (float running stats, an integer counter)."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * input_shape[1] * input_shape[2], num_outputs),
    )


def shape_only(input_shape: tuple[int, ...]) -> nn.Module:
    """Takes only input_shape: build_module must not pass the others."""
    return nn.Linear(input_shape[0], 2)


def everything(**kwargs: Any) -> nn.Module:
    """Takes anything: build_module passes all three arguments."""
    everything.seen = kwargs  # type: ignore[attr-defined]
    return nn.Linear(kwargs["input_shape"][0], kwargs["num_outputs"])


def failing(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    raise ValueError("this factory is broken")


def not_a_module(input_shape: tuple[int, ...], num_outputs: int) -> object:
    return [input_shape, num_outputs]


def double_net(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return nn.Linear(input_shape[0], num_outputs).double()


def odd_task() -> nn.Module:
    return nn.Linear(1, 1)


odd_task.task = "clustering"  # type: ignore[attr-defined]
NOT_CALLABLE = 3


def _user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    """A fresh importable module (outside fedge) holding ``source``; returns its name."""
    name = f"fedge_user_models_{next(_counter)}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


# ---------------------------------------------------------------------- model args


def test_model_args_round_trip() -> None:
    args = model_args_of((1, 28, 28), 10)
    assert args == {"input_shape": "1,28,28", "num_outputs": 10}
    assert parse_model_args(args) == ((1, 28, 28), 10)


def test_model_args_accept_an_int_shape_and_a_missing_output_count() -> None:
    assert parse_model_args({"input_shape": 13}) == ((13,), 0)
    assert parse_model_args({"input_shape": " 3, 20 ", "num_outputs": 2, "x": "y"}) == ((3, 20), 2)


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"input_shape": ""},
        {"input_shape": "1,x"},
        {"input_shape": "0,3"},
        {"input_shape": "-1"},
        {"input_shape": 1.5},
        {"input_shape": True},
        {"input_shape": ",".join(["2"] * 9)},
        {"input_shape": "3", "num_outputs": -1},
        {"input_shape": "3", "num_outputs": True},
        {"input_shape": "3", "num_outputs": 2.0},
        {"input_shape": "3", "num_outputs": "2"},
    ],
)
def test_bad_model_args_are_refused(args: dict[str, Any]) -> None:
    with pytest.raises(TrainConfigError):
        parse_model_args(args)


def test_model_args_of_checks_its_arguments() -> None:
    with pytest.raises(TrainConfigError, match="input_shape"):
        model_args_of((0, 3), 2)
    with pytest.raises(TrainConfigError, match="num_outputs"):
        model_args_of((3,), -2)


# ---------------------------------------------------------------------- factories


def test_build_module_from_a_zoo_spec_text_or_a_model_spec() -> None:
    module = build_module("zoo:mlp_regressor", input_shape=(4,), num_outputs=2, task="regression")
    assert module(torch.zeros(3, 4)).shape == (3, 2)
    spec = ModelSpec(HERE, "bn_net")
    module = build_module(spec, input_shape=(1, 4, 4), num_outputs=3, task="classification")
    assert module(torch.zeros(2, 1, 4, 4)).shape == (2, 3)


def test_build_module_passes_only_the_arguments_a_factory_accepts() -> None:
    module = build_module(f"{HERE}:shape_only", input_shape=(5,), num_outputs=9, task="regression")
    assert isinstance(module, nn.Linear)
    assert module.in_features == 5
    build_module(f"{HERE}:everything", input_shape=(5,), num_outputs=9, task="regression")
    assert everything.seen == {  # type: ignore[attr-defined]
        "input_shape": (5,),
        "num_outputs": 9,
        "task": "regression",
    }


def test_a_failing_factory_is_a_training_error() -> None:
    with pytest.raises(TrainingError, match=r"factory failed.*this factory is broken"):
        build_module(f"{HERE}:failing", input_shape=(2,), num_outputs=2, task="classification")


def test_a_factory_returning_no_module_is_a_training_error() -> None:
    with pytest.raises(TrainingError, match=r"returned list, not a torch\.nn\.Module"):
        build_module(f"{HERE}:not_a_module", input_shape=(2,), num_outputs=2, task="classification")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fedge_no_such_package.models:net", "no module 'fedge_no_such_package.models'"),
        (f"{HERE}:no_such_factory", "has no 'no_such_factory'"),
        (f"{HERE}:NOT_CALLABLE", "is not a function"),
        ("not a spec", "must be module.path:function"),
        ("zoo:resnet50", "the zoo has no model 'resnet50'"),
    ],
)
def test_unknown_models_are_refused(spec: str, message: str) -> None:
    with pytest.raises(UnknownModelError, match=message):
        build_module(spec, input_shape=(2,), num_outputs=2, task="classification")
    with pytest.raises(UnknownModelError, match=message):
        factory_task(spec)


def test_a_module_that_fails_to_import_is_a_training_error_not_an_unknown_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = _user_module(tmp_path, monkeypatch, "raise RuntimeError('bad config at import')\n")
    with pytest.raises(TrainingError, match="bad config at import") as caught:
        build_module(f"{broken}:net", input_shape=(2,), num_outputs=2, task="classification")
    assert not isinstance(caught.value, UnknownModelError)
    needs = _user_module(tmp_path, monkeypatch, "import fedge_missing_dependency\n")
    with pytest.raises(TrainingError, match="fedge_missing_dependency") as caught:
        factory_task(f"{needs}:net")
    assert not isinstance(caught.value, UnknownModelError)


def test_a_user_module_outside_fedge_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _user_module(
        tmp_path,
        monkeypatch,
        "from torch import nn\n"
        "def tiny(input_shape, num_outputs):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1], "
        "num_outputs))\n"
        "tiny.task = 'classification'\n",
    )
    module = build_module(f"{name}:tiny", input_shape=(2, 3), num_outputs=4, task="classification")
    assert module(torch.zeros(1, 2, 3)).shape == (1, 4)
    assert factory_task(f"{name}:tiny") == "classification"


def test_factory_task_reads_the_attribute() -> None:
    assert factory_task("zoo:dense_autoencoder") == "reconstruction"
    assert factory_task("zoo:mlp_regressor") == "regression"
    assert factory_task(parse_model_spec("zoo:small_cnn")) is None
    assert factory_task(f"{HERE}:bn_net") is None
    with pytest.raises(TrainingError, match="clustering"):
        factory_task(f"{HERE}:odd_task")


def test_without_torch_building_is_refused_with_no_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _user_module(tmp_path, monkeypatch, "import torch\ndef net(): pass\n")
    monkeypatch.setitem(sys.modules, "torch", None)  # what an import sees without torch
    with pytest.raises(TorchUnavailableError, match=r"fedge\[torch\]") as caught:
        build_module("zoo:small_cnn", input_shape=(1, 8, 8), num_outputs=2, task="classification")
    assert caught.value.code == "no_torch"
    with pytest.raises(TorchUnavailableError):
        factory_task(f"{name}:net")
    with pytest.raises(TorchUnavailableError):
        module_weights(nn.Linear(1, 1))
    assert factory_task("zoo:dense_autoencoder") == "reconstruction"  # the zoo imports lazily


# ---------------------------------------------------------------------- weights


def _bn_module(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    module = bn_net((1, 4, 4), 3)
    module.train()
    with torch.no_grad():  # move the running statistics off their initial values
        module(torch.randn(8, 1, 4, 4) * 3 + 1)
    return module


def test_module_weights_follow_the_state_dict_with_float_buffers_only() -> None:
    module = _bn_module(0)
    weights = module_weights(module)
    state = module.state_dict()
    assert list(weights) == [name for name in state if name != "1.num_batches_tracked"]
    assert "1.running_mean" in weights
    assert "1.running_var" in weights
    for name, array in weights.items():
        assert array.dtype == np.float32
        assert array.shape == tuple(state[name].shape)
        np.testing.assert_array_equal(array, state[name].numpy())
    weights["0.weight"][...] = 0.0  # a copy: the module is unaffected
    assert module.state_dict()["0.weight"].abs().sum() > 0


def test_weights_round_trip_including_batchnorm_statistics() -> None:
    source, target = _bn_module(0), _bn_module(1)
    target_count = int(target.state_dict()["1.num_batches_tracked"])
    weights = module_weights(source)
    for array in weights.values():
        array.setflags(write=False)  # weights off the wire may be read-only
    load_module_weights(target, weights)
    for name, tensor in target.state_dict().items():
        if name == "1.num_batches_tracked":
            assert int(tensor) == target_count  # integer buffers do not travel
        else:
            np.testing.assert_array_equal(tensor.numpy(), source.state_dict()[name].numpy())
    target.eval()
    source.eval()
    x = torch.randn(4, 1, 4, 4)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_float64_modules_travel_as_float32() -> None:
    torch.manual_seed(0)
    module = double_net((3,), 2)
    weights = module_weights(module)
    assert {a.dtype for a in weights.values()} == {np.dtype(np.float32)}
    load_module_weights(module, {n: a + 1 for n, a in weights.items()})
    assert module.weight.dtype == torch.float64
    np.testing.assert_allclose(module.weight.detach().numpy(), weights["weight"] + 1, rtol=1e-6)


def test_loading_does_not_modify_the_given_weights() -> None:
    module = _bn_module(0)
    weights = module_weights(_bn_module(1))
    before = {n: a.copy() for n, a in weights.items()}
    load_module_weights(module, weights)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(1.0)
    for name, array in weights.items():
        np.testing.assert_array_equal(array, before[name])


def test_loading_is_strict() -> None:
    module = _bn_module(0)
    good = module_weights(module)
    missing = {n: a for n, a in good.items() if n != "1.running_var"}
    with pytest.raises(TrainingError, match=r"missing \['1.running_var'\]"):
        load_module_weights(module, missing)
    with pytest.raises(TrainingError, match=r"unexpected \['extra'\]"):
        load_module_weights(module, {**good, "extra": np.zeros(1, np.float32)})
    with pytest.raises(TrainingError, match=r"unexpected.*1\.num_batches_tracked"):
        load_module_weights(module, {**good, "1.num_batches_tracked": np.zeros((), np.float32)})
    wrong_shape = {**good, "4.bias": np.zeros(4, np.float32)}
    with pytest.raises(TrainingError, match=r"'4.bias' has shape \(4,\), the model expects \(3,\)"):
        load_module_weights(module, wrong_shape)
    nan = {**good, "4.bias": np.full(3, np.nan, np.float32)}
    with pytest.raises(TrainingError, match="NaN or infinity"):
        load_module_weights(module, nan)
    huge = {**good, "4.bias": np.full(3, 1e300)}  # beyond float32: not a RuntimeWarning
    with pytest.raises(TrainingError, match="NaN or infinity"):
        load_module_weights(module, huge)
    text = {**good, "4.bias": np.array(["a", "b", "c"])}
    with pytest.raises(TrainingError, match="real numbers"):
        load_module_weights(module, text)
    np.testing.assert_array_equal(module_weights(module)["4.bias"], good["4.bias"])


def test_initial_weights_are_seeded_and_leave_the_global_generator_alone() -> None:
    args: dict[str, Any] = {"task": "classification", "input_shape": (1, 4, 4), "num_outputs": 3}
    state = torch.random.get_rng_state()
    first = initial_weights(f"{HERE}:bn_net", seed=7, **args)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = initial_weights(f"{HERE}:bn_net", seed=7, **args)
    other = initial_weights(f"{HERE}:bn_net", seed=8, **args)
    assert list(first) == list(again)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert any(not np.array_equal(first[n], other[n]) for n in first)
    with pytest.raises(TrainConfigError, match="seed"):
        initial_weights(f"{HERE}:bn_net", seed=-1, **args)
