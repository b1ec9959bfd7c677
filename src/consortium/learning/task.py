"""A study's task: its model, its per-example loss, its training step and its evaluation as sums.

A ``Task`` is the one place a study's own code enters a run. Write it once,
as a subclass of ``ClassificationTask`` or ``RegressionTask`` (which bring the
loss and the evaluation), and name it in the config (``task:
my_study/tasks.py:Chest`` or ``task: my_study.tasks:Chest``) or pass it to
``consortium.simulate(task=...)``::

    class Chest(ClassificationTask):
        def model(self, shape):
            return nn.Sequential(shape.standardize(), nn.Flatten(), nn.Linear(shape.n_features, shape.n_classes))

        def loss(self, outputs, targets):          # one value per example
            return F.cross_entropy(outputs, targets, weight=WEIGHTS, reduction="none")

The framework keeps what a privacy claim rests on, whatever the task says:
under record-level DP it runs the DP-SGD loop itself (Poisson sampling,
per-example gradients of the task's loss, clipping, noise, accounting) and
never calls ``train``; under site-level DP it clips and noises whatever
update ``train`` produced; and evaluation leaves a site only as the fixed-length
vector of sums ``evaluate`` returns, so secure aggregation covers it.

The built-in tasks, ``"classification"`` and ``"regression"``, train the
built-in models (``model.kind``: logistic, mlp, cnn) through the same interface.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from consortium.data import Records, StreamedTable, Table
from consortium.errors import ConfigError, DataError, ModelError
from consortium.learning.identity import is_file_ref, task_code
from consortium.learning.models import Standardize
from consortium.learning.specs import ModelSpec, TrainSettings
from consortium.learning.training import Groups, TrainingData, train_local

#: What a task's ``target`` may be: class indices (int64) or values (float32).
Target = Literal["classification", "regression"]


@dataclass(frozen=True)
class DataShape:
    """What a task's model is built for: the consortium's data layout and its pooled statistics.

    Attributes:
        n_features: features per record (an image's pixels, flattened, for image data).
        classes: the class labels in order; empty for regression.
        image_shape: ``(channels, height, width)`` when each record is an image, else None.
        mean, scale: each feature's mean and standard deviation over every site's training records
            (from the setup stage's secure sums; never one site's figure).
        target_mean, target_scale: a regression target's mean and deviation, likewise (0 and 1 for
            classes): a regression model predicts the standardised target (``RegressionTask``).
    """

    n_features: int
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int] | None
    mean: np.ndarray
    scale: np.ndarray
    target_mean: float = 0.0
    target_scale: float = 1.0

    @property
    def n_classes(self) -> int:
        """The number of classes (0 for regression)."""
        return len(self.classes)

    def standardize(self) -> nn.Module:
        """A first layer mapping x to (x - mean) / scale with the consortium's statistics, and a missing
        value (NaN) to 0, the consortium-wide mean: put it first in a model that reads table features."""
        return Standardize(self.mean, self.scale)


@dataclass(frozen=True)
class Evaluation:
    """The metrics of a summed evaluation vector, and what else the transcript keeps of it (plain JSON)."""

    metrics: dict[str, float]
    details: dict[str, object]


@dataclass(frozen=True)
class EvalOptions:
    """What a round asks a site to measure beyond the task's metrics (classification only today):
    the two groups of a sensitive attribute (fairness gaps) and a distribution shift."""

    groups: Groups | None = None
    shifted: torch.Tensor | None = None


class Task:
    """The base of every task; subclass ``ClassificationTask`` or ``RegressionTask`` rather than this.

    Override ``model`` (required) and, where the study needs them, ``loss``, ``train`` and ``load``.
    A task holds no data and no state between calls: a site builds its model, trains and evaluates
    through it, and keeps its records itself.
    """

    #: What the labels are: class indices (classification) or numbers (regression).
    target: ClassVar[Target]
    #: The metric the output leads with (and the baselines are compared on).
    headline: ClassVar[str]

    @property
    def name(self) -> str:
        """How the config, the transcript and the sites name this task: as it was loaded (``load_task``), else
        ``module:Class``."""
        return getattr(self, "_registered_name", None) or f"{type(self).__module__}:{type(self).__qualname__}"

    def model(self, shape: DataShape) -> nn.Module:
        """The task's model, freshly initialised (the framework seeds torch's generator before calling).

        Args:
            shape: the data's layout and the consortium's feature statistics.

        Returns:
            Any ``torch.nn.Module`` taking a float32 batch of shape ``(batch, shape.n_features)`` (reshape
            inside for images) and returning one row of outputs per example. Under record-level DP it must
            not mix examples within a batch (BatchNorm is refused before training, with the fix).
        """
        raise NotImplementedError(f"{type(self).__name__} must define model(shape)")

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The per-example loss: one value per example (``reduction="none"``), differentiable; ``targets``
        are as ``training_targets`` gives them."""
        raise NotImplementedError

    def training_targets(self, y: torch.Tensor, shape: DataShape) -> torch.Tensor:
        """The targets the model trains on, from a site's labels (default: as they are)."""
        return y

    def load(self, path: Path) -> Records:
        """Read one site's data from ``path`` (a folder of images, an array file, anything the study keeps),
        at the site, from the path in the site's own configuration; never from the coordinator.

        Optional: a task without it reads a CSV against the agreed schema. Return a ``Table`` (float32
        features, one row per record, ``image_shape`` set for images; int64 class indices with ``classes``,
        or float32 targets with no classes for a regression): ``consortium.data.load_image_folder`` and
        ``load_image_array`` read images of any size. For data larger than memory return a
        ``StreamedTable`` over a map-style ``torch.utils.data.Dataset`` (those two readers give one with
        ``stream=True``): every step then reads it a batch at a time.

        Raises:
            DataError: the data cannot be read (one line naming the file and the fix).
        """
        raise NotImplementedError(f"{type(self).__name__} does not load data itself: give each site a CSV and a schema")

    def records(self, path: Path) -> Records:
        """``load(path)``, checked to be a site's records (what the framework calls; override ``load``).

        Raises:
            DataError: ``load`` returned something else, such as a bare ``torch.utils.data.Dataset`` (one
                line: wrap it in a ``StreamedTable``, which says what its records mean).
        """
        records = self.load(path)
        if not isinstance(records, (Table, StreamedTable)):
            raise DataError(
                f"{self.name}.load returned a {type(records).__name__}: return a consortium.data.Table, or wrap a "
                "dataset as StreamedTable(dataset, classes=..., image_shape=...) so that its records have a layout"
            )
        return records

    @property
    def loads_data(self) -> bool:
        """Whether this task reads its sites' data itself (it defines ``load``)."""
        return type(self).load is not Task.load

    def train(
        self, model: nn.Module, data: TrainingData, settings: TrainSettings, *,
        seed: int, proximal_mu: float = 0.0, proximal_center: list[torch.Tensor] | None = None,
    ) -> float:
        """Local training without record-level DP (no DP, or site-level DP): train ``model`` in place.

        The default is mini-batch SGD or Adam on the mean of ``loss`` (``settings``), with FedProx's term
        when ``proximal_mu > 0``. Override it to bring the study's own loop; under site-level DP the
        site clips the resulting update and the noise joins it afterwards, so the claim holds whatever
        it does. Record-level rounds never call it.

        ``data`` is the site's training split (``TrainingData``): ``data.batches(size, generator=...)``
        yields shuffled mini-batches of (features, training targets) tensors, read on demand when the
        task's ``load`` returned a ``StreamedTable``; ``data.tensors()`` gives every row at once.

        Returns:
            The mean training loss of the last epoch (reported only inside the summed update).
        """
        return train_local(
            model, data, settings, seed=seed, proximal_mu=proximal_mu, proximal_center=proximal_center, loss=self.loss
        )

    def evaluate(self, model: nn.Module, X: torch.Tensor, y: torch.Tensor, shape: DataShape, options: EvalOptions) -> np.ndarray:
        """One site's evaluation: a float64 vector of ``statistics_length(shape)`` sums that add up across sites."""
        raise NotImplementedError

    def statistics_length(self, shape: DataShape) -> int:
        """The length of ``evaluate``'s vector: fixed by the data's shape, the same at every site."""
        raise NotImplementedError

    def summarise(self, total: np.ndarray, shape: DataShape, *, groups: bool = False, shift: bool = False) -> Evaluation:
        """The metrics of the sites' summed vectors (a pure function of the sum: secure aggregation decodes
        nothing else). ``groups``/``shift``: whether the round asked for the fairness groups and the shift."""
        raise NotImplementedError

    def no_better_than_constant(self, metrics: dict[str, float]) -> str | None:
        """A warning when ``metrics`` (a summed evaluation's) are no better than a constant prediction's
        (the majority class, the mean), else None."""
        return None

    def with_model(self, spec: ModelSpec) -> Task:
        """This task with the built-in architecture ``spec`` names: a built-in task builds what a round's
        closed model spec says; a study's own task has its own model and ignores it (the default)."""
        return self

# ---------------------------------------------------------------------------
# Naming and loading tasks

_REGISTRY: dict[str, Callable[[ModelSpec], Task]] = {}


def register_task(name: str, factory: Callable[[ModelSpec], Task]) -> None:
    """Register a built-in task under ``name``: ``factory(model_spec)`` makes it (``model.kind`` in the config)."""
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise ValueError(f"a task's registered name is lower-case letters, digits and '-', got {name!r}")
    _REGISTRY[name] = factory


def registered_tasks() -> tuple[str, ...]:
    """The built-in tasks' names."""
    import consortium.learning.builtin_tasks  # noqa: F401  (registers the built-ins)

    return tuple(sorted(_REGISTRY))


def load_task(ref: str, model: ModelSpec | None = None) -> Task:
    """The task ``ref`` names: a built-in (``"classification"``, ``"regression"``: ``model`` picks its
    architecture), ``package.module:Class`` (importable here) or ``path/to/file.py:Class`` (a local file).

    The code is this machine's own: a site loads its task from its local copy, never from bytes sent to it.

    Raises:
        ConfigError: the name is unknown, the module or file cannot be imported, or the class is not a
            ``Task`` that can be made without arguments (one line, with the fix).
    """
    names = registered_tasks()
    if ":" not in ref:
        if ref not in _REGISTRY:
            raise ConfigError(f"unknown task '{ref}': choose one of {', '.join(names)}, or name your own as module:Class")
        task = _REGISTRY[ref](model or ModelSpec())
        task._registered_name = ref  # type: ignore[attr-defined]
        return task
    where, _, cls_name = ref.rpartition(":")
    module = _import(where)
    cls = getattr(module, cls_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise ConfigError(f"task '{ref}': {where} has no Task subclass '{cls_name}': define it there, or fix the name")
    try:
        task = cls()
    except TypeError as exc:
        raise ConfigError(f"task '{ref}' cannot be made without arguments ({exc}): give its options defaults") from None
    task._registered_name = ref  # type: ignore[attr-defined]  (named as the config names it: it loads again)
    return task


def _import(where: str) -> object:
    if is_file_ref(where):
        path = Path(where).resolve()
        if not path.is_file():
            raise ConfigError(f"task file '{where}' does not exist: give the path of the .py file that defines the task")
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        name = f"consortium_task_{path.stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent))  # as for a script: the file may import the modules beside it
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ConfigError(f"task file '{where}' failed to import ({type(exc).__name__}: {exc}): fix that file") from None
        finally:
            sys.path.remove(str(path.parent))
        return module
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise ConfigError(
            f"task module '{where}' cannot be imported ({exc}): install it, or name the file (path/to/file.py:Class)"
        ) from None


def task_reference(task: Task) -> str | None:
    """How ``task``'s code is found here: the reference it was loaded by, else its class's file
    (``path/to/file.py:Class``); None for a built-in task (the framework's own code) or a class with no
    file (a notebook cell)."""
    ref = getattr(task, "_registered_name", None)
    if ref is not None:
        return ref if ":" in ref else None
    cls = type(task)
    try:
        inspect.getsource(cls)  # the class is really in the file its module names (not one typed at a prompt)
        path = inspect.getsourcefile(cls)
    except (OSError, TypeError):
        return None
    if path is None or not Path(path).is_file() or cls.__module__.startswith("consortium."):
        return None
    return f"{path}:{cls.__qualname__}"


def task_identity(task: Task) -> dict[str, str]:
    """What the manifest names of a task and each site endorses: its name and its code's SHA-256.

    A study's task: ``consortium.learning.identity.task_code`` (every file of its package and the
    distributions it imports), read now: a changed byte or dependency is another task. A built-in task:
    its source file in the framework (which the manifest's code hash also pins) and its name. A class defined in a
    notebook cell, which has no file: its source text. ``"code"`` says which: ``"package"``,
    ``"framework"`` or ``"class"``.

    Raises:
        ConfigError: the code cannot be read or pinned (defined at an interactive prompt, a dependency missing).
    """
    ref = task_reference(task)
    if ref is not None:
        return {"name": task.name, "sha256": task_code(ref).sha256, "code": "package"}
    cls = type(task)
    try:  # the class's own text, found where its module says it is (a file, or a notebook cell)
        source = inspect.getsource(cls)
        path = inspect.getsourcefile(cls)
    except (OSError, TypeError):
        raise ConfigError(
            f"the source of task {task.name} cannot be read, so no site could check it: define the task in a .py file "
            "or a notebook cell"
        ) from None
    if path is not None and Path(path).is_file():
        # Two built-ins share a file: the name (the registered one) tells them apart.
        source_bytes = Path(path).read_bytes() + b"\0" + task.name.encode()
        return {"name": task.name, "sha256": hashlib.sha256(source_bytes).hexdigest(), "code": "framework"}
    return {"name": task.name, "sha256": hashlib.sha256(source.encode()).hexdigest(), "code": "class"}


def evaluate_records(
    task: Task, model: nn.Module, records: Records, shape: DataShape,
    options: Callable[[torch.Tensor], EvalOptions] = lambda X: EvalOptions(),
) -> np.ndarray:
    """``task.evaluate`` over ``records`` a batch at a time, summed (a batch's sums add up as a site's do;
    in memory, one batch). ``options(X)`` gives a batch's options (a shift is drawn per batch).

    Raises:
        ModelError: ``evaluate`` returned another length than ``statistics_length`` (one line, with the fix).
    """
    length = task.statistics_length(shape)
    total = np.zeros(length)
    for batch in records.batches():
        X = torch.from_numpy(batch.X)
        part = np.asarray(task.evaluate(model, X, torch.from_numpy(batch.y), shape, options(X)), dtype=np.float64)
        if part.shape != (length,):
            raise ModelError(
                f"{task.name}.evaluate returned {part.shape} values where statistics_length gives {length}: "
                "return one fixed-length vector of sums"
            )
        total = total + part
    return total


def build_task_model(task: Task, shape: DataShape, seed: int = 0) -> nn.Module:
    """``task.model(shape)`` with its initial weights decided by ``seed`` (the caller's random state untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = task.model(shape)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{task.name}.model() returned a {type(module).__name__}: return a torch.nn.Module")
    return module
