"""Reference datasets and centrally trained reference models.

Quantization, packaging and federated runs are judged against a model trained
centrally on the same data. This module gives tests, benchmarks and examples one
shared definition of that workload, so their figures are comparable:

1. :func:`load_digits_split` loads scikit-learn's bundled *digits* dataset (8x8
   grey-scale images, 10 classes, no download), scales pixels to ``[0, 1]`` and makes a
   deterministic, stratified train/test split;
2. :func:`train_reference_mlp` / :func:`train_reference_softmax` train a model with
   scikit-learn and return its weights in fedge's built-in family layout
   (``W0, b0, ...``, see :mod:`compress.families`), ready for
   :func:`compress.onnx_export.export_onnx`.

scikit-learn is a coordinator-side dependency (``fedge[coordinator]``) and is imported
inside the functions.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DIGITS_PIXEL_MAX",
    "dirichlet_partition",
    "group_partition",
    "load_digits_split",
    "quantile_bins",
    "random_test_mask",
    "stratified_test_mask",
    "train_reference_mlp",
    "train_reference_softmax",
]

DIGITS_PIXEL_MAX = 16.0
"""Largest pixel value of the digits dataset; pixels are divided by it."""

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]


def load_digits_split(
    seed: int = 0, *, test_size: float = 0.3
) -> tuple[FloatArray, LabelArray, FloatArray, LabelArray]:
    """The digits dataset, scaled to ``[0, 1]`` and split into train and test sets.

    The split is stratified by class and deterministic for a given ``seed``.

    Args:
        seed: ``random_state`` of the split.
        test_size: Fraction of the samples in the test set.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 features of shape ``(n, 64)``
        and int64 labels in ``0..9``.

    Raises:
        ModuleNotFoundError: scikit-learn is not installed.
    """
    _require_sklearn()
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    data = load_digits()
    x = (np.asarray(data.data, dtype=np.float32) / np.float32(DIGITS_PIXEL_MAX)).astype(np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return (
        np.ascontiguousarray(x_train, dtype=np.float32),
        np.asarray(y_train, dtype=np.int64),
        np.ascontiguousarray(x_test, dtype=np.float32),
        np.asarray(y_test, dtype=np.int64),
    )


def dirichlet_partition(
    labels: npt.ArrayLike, clients: int, alpha: float, *, seed: int = 0, min_examples: int = 1
) -> list[npt.NDArray[np.int64]]:
    """Split example indices among clients with label skew drawn from Dirichlet(alpha).

    For each class, the class's examples are shuffled and cut in proportions drawn
    from a symmetric Dirichlet(``alpha``) over the clients (small ``alpha``: each
    client sees few classes; large: close to IID). Draws are repeated (same RNG
    stream) until every client holds at least ``min_examples``, so the result is
    deterministic for a given ``seed``.

    Args:
        labels: One integer label per example.
        clients: Number of clients (>= 1).
        alpha: Concentration (> 0).
        seed: RNG seed.
        min_examples: Fewest examples per client.

    Returns:
        One sorted index array per client; together they cover every example once.

    Raises:
        ValueError: bad arguments, or fewer examples than ``clients * min_examples``.
    """
    y = np.asarray(labels)
    if clients < 1 or not alpha > 0 or min_examples < 0:
        raise ValueError("need clients >= 1, alpha > 0 and min_examples >= 0")
    if len(y) < clients * min_examples:
        raise ValueError(f"{len(y)} examples cannot give {clients} clients {min_examples} each")
    rng = np.random.default_rng(seed)
    for _attempt in range(1000):
        parts: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(clients)]
        for label in np.unique(y):
            members = np.flatnonzero(y == label)
            rng.shuffle(members)
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, piece in enumerate(np.split(members, cuts)):
                parts[client].append(piece.astype(np.int64))
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(r) for r in result) >= min_examples:
            return result
    raise ValueError(f"no Dirichlet({alpha}) split gave every client {min_examples} examples")


def stratified_test_mask(
    labels: npt.ArrayLike, fraction: float, seed: int
) -> npt.NDArray[np.bool_]:
    """Which examples go to the test set: ``round(fraction * count)`` of each class.

    Each class's examples are shuffled by ``numpy.random.default_rng(seed)`` (one
    stream, classes in sorted order), so the split is deterministic for a seed.

    Args:
        labels: One label per example (any values that sort).
        fraction: Share of each class in the test set, in ``[0, 1]``.
        seed: RNG seed.

    Returns:
        A boolean mask, True for a test example.

    Raises:
        ValueError: ``fraction`` outside ``[0, 1]``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the test fraction must be in [0, 1], got {fraction}")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        test_mask[members[: round(fraction * len(members))]] = True
    return test_mask


def random_test_mask(n: int, fraction: float, seed: int) -> npt.NDArray[np.bool_]:
    """Which of ``n`` examples go to the test set: ``round(fraction * n)`` drawn at random.

    Deterministic for a seed (``numpy.random.default_rng(seed).permutation``).

    Raises:
        ValueError: ``fraction`` outside ``[0, 1]``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the test fraction must be in [0, 1], got {fraction}")
    test_mask = np.zeros(n, dtype=bool)
    test_mask[np.random.default_rng(seed).permutation(n)[: round(fraction * n)]] = True
    return test_mask


def quantile_bins(targets: npt.ArrayLike, bins: int) -> npt.NDArray[np.int64]:
    """Bin regression targets into ``bins`` groups of about equal size, ``0..bins-1``.

    A 2-D target ``(n, k)`` is binned by its mean over the ``k`` outputs. The bins
    are the labels a label-skewed split (:func:`dirichlet_partition`) skews by, so
    that clients see different ranges of the target.

    Raises:
        ValueError: ``bins < 1``, no targets, or targets of rank above 2.
    """
    y = np.asarray(targets, dtype=np.float64)
    if bins < 1 or y.ndim not in (1, 2) or len(y) == 0:
        raise ValueError(f"need bins >= 1 and targets (n,) or (n, k), got {bins} and {y.shape}")
    values = y if y.ndim == 1 else y.mean(axis=1)
    edges = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="right").astype(np.int64)


def group_partition(
    groups: npt.ArrayLike, clients: int, *, min_examples: int = 1
) -> list[npt.NDArray[np.int64]]:
    """Split example indices by group: group ``i`` (in sorted order) goes to client
    ``i % clients``.

    The natural non-IID split of data that says where it came from (one speaker,
    one machine, one site per group): a client never shares a group with another.

    Args:
        groups: One integer group id per example.
        clients: Number of clients (>= 1).
        min_examples: Fewest examples per client.

    Returns:
        One sorted index array per client; together they cover every example once.

    Raises:
        ValueError: ``clients < 1``, or a client would hold fewer than
            ``min_examples`` (fewer groups than clients, or groups too small).
    """
    g = np.asarray(groups)
    if clients < 1:
        raise ValueError("need clients >= 1")
    ids = np.unique(g)
    clients_of = np.searchsorted(ids, g) % clients
    result = [np.flatnonzero(clients_of == c).astype(np.int64) for c in range(clients)]
    fewest = min(len(r) for r in result)
    if fewest < min_examples:
        raise ValueError(
            f"{len(ids)} groups over {clients} clients leave one with {fewest} examples, "
            f"fewer than {min_examples}"
        )
    return result


def train_reference_mlp(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    hidden: tuple[int, ...] = (512, 512),
    seed: int = 0,
    *,
    max_iter: int = 500,
) -> dict[str, FloatArray]:
    """Train a ReLU MLP with scikit-learn (Adam) and return its weights.

    Args:
        x: Training features, shape ``(n, n_features)``.
        y: Integer labels ``0..k-1`` with ``k >= 3`` and every class present.
        hidden: Sizes of the hidden layers (at least one).
        seed: ``random_state`` of the classifier (initialisation and shuffling).
        max_iter: Upper bound on training epochs; training stops earlier once the
            loss stops improving.

    Returns:
        Weights of the ``mlp`` family: ``W0, b0, ..., W{h}, b{h}`` as float32.

    Raises:
        ValueError: bad labels or hidden sizes, or training did not converge
            within ``max_iter`` epochs.
        ModuleNotFoundError: scikit-learn is not installed.
    """
    _require_sklearn()
    from sklearn.neural_network import MLPClassifier  # noqa: PLC0415

    if not hidden or any(int(h) <= 0 for h in hidden):
        raise ValueError(f"hidden must be one or more positive sizes, got {hidden!r}")
    x_arr, y_arr = _check_xy(x, y)
    clf = MLPClassifier(
        hidden_layer_sizes=tuple(int(h) for h in hidden),
        activation="relu",
        solver="adam",
        random_state=seed,
        max_iter=max_iter,
    )
    _fit(clf, x_arr, y_arr, f"the MLP did not converge within max_iter={max_iter} epochs")
    weights: dict[str, FloatArray] = {}
    for i, (coef, intercept) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True)):
        weights[f"W{i}"] = np.ascontiguousarray(coef, dtype=np.float32)
        weights[f"b{i}"] = np.ascontiguousarray(intercept, dtype=np.float32)
    return weights


def train_reference_softmax(
    x: npt.ArrayLike, y: npt.ArrayLike, seed: int = 0, *, max_iter: int = 5000
) -> dict[str, FloatArray]:
    """Train multinomial logistic regression with scikit-learn and return its weights.

    Args:
        x: Training features, shape ``(n, n_features)``.
        y: Integer labels ``0..k-1`` with ``k >= 3`` and every class present.
        seed: ``random_state`` of the solver.
        max_iter: Upper bound on solver iterations.

    Returns:
        Weights of the ``softmax`` family: ``W0`` ``(n_features, k)`` and ``b0`` ``(k,)``.

    Raises:
        ValueError: bad labels, or the solver did not converge within ``max_iter``.
        ModuleNotFoundError: scikit-learn is not installed.
    """
    _require_sklearn()
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    x_arr, y_arr = _check_xy(x, y)
    clf = LogisticRegression(max_iter=max_iter, random_state=seed)
    _fit(clf, x_arr, y_arr, f"logistic regression did not converge within max_iter={max_iter}")
    return {
        "W0": np.ascontiguousarray(np.asarray(clf.coef_).T, dtype=np.float32),
        "b0": np.ascontiguousarray(clf.intercept_, dtype=np.float32),
    }


def _fit(clf: Any, x: FloatArray, y: LabelArray, not_converged: str) -> None:
    """Fit a scikit-learn estimator; ``ValueError(not_converged)`` if it did not converge."""
    from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            clf.fit(x, y)
        except ConvergenceWarning as exc:
            raise ValueError(not_converged) from exc


def _check_xy(x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[FloatArray, LabelArray]:
    """Validate a training set for the built-in families.

    Raises:
        ValueError: wrong shapes, or labels that are not ``0..k-1`` with ``k >= 3``
            (scikit-learn gives binary models a single logistic output, which is not
            a softmax family).
    """
    x_arr = np.asarray(x, dtype=np.float32)
    y_arr = np.asarray(y)
    if x_arr.ndim != 2 or y_arr.ndim != 1 or x_arr.shape[0] != y_arr.shape[0]:
        raise ValueError(f"need x (n, features) and y (n,), got {x_arr.shape} and {y_arr.shape}")
    if not np.issubdtype(y_arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y_arr.dtype}")
    classes = np.unique(y_arr)
    if classes.size < 3 or not np.array_equal(classes, np.arange(classes.size)):
        raise ValueError(
            f"labels must be 0..k-1 with k >= 3 and every class present, got {classes.tolist()}"
        )
    return x_arr, y_arr.astype(np.int64)


def _require_sklearn() -> None:
    """Fail with an install hint if scikit-learn is missing.

    Raises:
        ModuleNotFoundError: scikit-learn is not installed.
    """
    try:
        import sklearn  # noqa: F401, PLC0415
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "reference datasets and models need scikit-learn; install it with "
            "`pip install 'fedge[coordinator]'`",
            name=exc.name,
        ) from exc
