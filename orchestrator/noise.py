"""rayclip's one noise policy: every rule that silences a third-party line, in one table keyed by process kind.

Each process calls :func:`install` once for its kind where it starts; business code silences nothing itself.
A row says what it matches, the library version it was written against, where the message comes from
(``source``: the module, or a file of the package, whose installed text must still contain ``evidence``;
``tests/unit/test_noise_policy.py`` checks every row against the pinned versions, so a dead rule fails) and
why the line is noise. The machinery (record filters, the forwarded-line printer) lives in ``logs``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator.logs import drop_forwarded_lines, drop_records, without_printed_lines

DRIVER = "driver"
"""A job's driver process (``start_ray``, or the Ray that data preparation starts)."""
RAY_PROCESS = "ray_process"
"""Every Ray worker process of a local Ray rayclip starts (its ``worker_process_setup_hook``, and the
environment of its runtime_env): Ray Train's controller, Ray Data's actors and tasks, Tune's trial actors."""
TRAIN_WORKER = "train_worker"
"""A Ray Train worker, at the start of ``train_loop_per_worker``."""
DATA_DRIVER = "data_driver"
"""A driver that runs a Ray Data pipeline itself (``jobs/evaluate.py``'s feature pipeline)."""
TUNE_DRIVER = "tune_driver"
"""The driver of a Tune search, before Tune starts."""
TRACKING = "tracking"
"""Any process that opens the MLflow store (a job's driver, Train rank 0, the Tune driver)."""
TESTS = "tests"
"""The pytest process: warnings of libraries the tests import directly (``tests/conftest.py``)."""
KINDS = (DRIVER, RAY_PROCESS, TRAIN_WORKER, DATA_DRIVER, TUNE_DRIVER, TRACKING, TESTS)

EXPLAINED_FAILURE = "explained_failure"
"""A ``when`` of :func:`install`: a Train worker's error that rayclip's own line explains (``failures``)."""


@dataclass(frozen=True, kw_only=True)
class Rule:
    kinds: tuple[str, ...]
    source: str
    """The module (``pkg.mod``) or package file (``pkg:relative/path``) that emits the message."""
    library: str
    """The library and version the rule was written against, e.g. ``ray 2.60.0``."""
    why: str
    when: str | None = None
    """Installed only by ``install(kind, when=...)`` (None: at the process's start)."""

    @property
    def evidence(self) -> tuple[str, ...]:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class DropRecords(Rule):
    """Records of ``logger`` whose message starts with one of ``prefixes``; ``logger_is_file``: the logger is
    named by the source file's path (``source``'s installed file)."""
    logger: str = ""
    prefixes: tuple[str, ...]
    logger_is_file: bool = False
    text: tuple[str, ...] = ()
    """The literal text of the source when a message is formatted (default: ``prefixes``)."""

    @property
    def evidence(self) -> tuple[str, ...]:
        return self.text or self.prefixes


@dataclass(frozen=True, kw_only=True)
class DropPrinted(Rule):
    """Lines a library prints to stdout that start with ``prefix`` (see :func:`printed_lines_dropped`)."""
    prefix: str
    text: str

    @property
    def evidence(self) -> tuple[str, ...]:
        return (self.text,)


@dataclass(frozen=True, kw_only=True)
class DropForwarded(Rule):
    """Lines Ray forwards to the driver (its processes' output, the C++ core's warnings) containing ``fragment``."""
    fragment: str
    text: str

    @property
    def evidence(self) -> tuple[str, ...]:
        return (self.text,)


@dataclass(frozen=True, kw_only=True)
class IgnoreWarning(Rule):
    """``warnings`` whose message matches the regex ``message`` (from its start), of ``category``."""
    message: str = ""
    category: str = "Warning"
    """The category's import path, ``builtins.FutureWarning`` or ``sklearn.exceptions.ConvergenceWarning``."""
    text: str = ""

    @property
    def evidence(self) -> tuple[str, ...]:
        return (self.text or self.category.rsplit(".", 1)[1],)

    def category_class(self) -> type[Warning]:
        module, name = self.category.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True, kw_only=True)
class SetEnv(Rule):
    """An environment variable the library reads; set before the library starts (see :func:`env_for`)."""
    name: str
    value: str

    @property
    def evidence(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, kw_only=True)
class LoggerLevel(Rule):
    """A third-party logger's level; ``applied_by`` names the library's own setting that takes it, where the
    library resets the level itself (read with :func:`level_for`), else :func:`install` sets it."""
    logger: str
    level: str
    applied_by: str | None = None
    text: str = ""

    @property
    def evidence(self) -> tuple[str, ...]:
        return (self.text,)


@dataclass(frozen=True, kw_only=True)
class RayDataOption(Rule):
    """An attribute of Ray Data's current ``DataContext`` in this process."""
    name: str
    value: object

    @property
    def evidence(self) -> tuple[str, ...]:
        return (self.name,)


RAY = "ray 2.60.0"
RULES: tuple[Rule, ...] = (
    # A job's driver.
    DropRecords(kinds=(DRIVER,), source="ray._private.authentication.authentication_token_setup", library=RAY,
                logger="ray._private.authentication.authentication_token_setup",
                prefixes=("Token authentication is enabled for this",),
                why="no upstream issue: Ray's notice that token auth is on, its default since 2.59, at every local start"),
    LoggerLevel(kinds=(DRIVER,), source="ray._private.worker", library=RAY, logger="ray", level="WARNING",
                applied_by="ray.init(logging_level)", text="logging_level",
                why="no upstream issue: ray.init's INFO lines (dashboard URL, session folder) say nothing to act on"),
    DropForwarded(kinds=(DRIVER,), source="ray:_raylet.so", library=RAY,
                  fragment="has constructor arguments in the object store and max_restarts > 0",
                  text="has constructor arguments in the object store and max_restarts > 0",
                  why="ray #53727: Ray Train's and Ray Data's own actors may not restart; the user cannot act on it"),
    DropForwarded(kinds=(DRIVER,), source="ray:core/src/ray/raylet/raylet", library=RAY,
                  fragment="PYTHON worker processes have been started on node",
                  text="worker processes have been started on node",
                  why="ray #3644: the raylet's warning on a 2-core laptop starting more Python workers than cores"),
    # Every process of the local Ray (worker_process_setup_hook, runtime_env env_vars).
    SetEnv(kinds=(RAY_PROCESS,), source="ray.data._internal.logging", library=RAY, name="RAY_DATA_LOG_LEVEL",
           value="WARNING", why="no upstream issue: Ray Data's per-dataset INFO lines (plans, log folders) are for debugging"),
    SetEnv(kinds=(RAY_PROCESS,), source="ray.data.context", library=RAY, name="RAY_DATA_DISABLE_PROGRESS_BARS",
           value="1", why="no upstream issue: progress bars redraw over the job's own progress lines (rate, ETA)"),
    DropRecords(kinds=(RAY_PROCESS, DATA_DRIVER), source="ray.data._internal.progress", library=RAY,
                logger="ray.data._internal.progress", prefixes=("Progress bars disabled",),
                why="no upstream issue: Ray Data says the bars are off, which rayclip asks for on purpose"),
    DropRecords(kinds=(RAY_PROCESS,), source="ray.train.v2._internal.execution.controller.placement_group_cleaner",
                library=RAY, logger="ray.train.v2._internal.execution.controller.placement_group_cleaner",
                prefixes=("Detected that the Ray Train controller actor",),
                why="no upstream issue: the cleaner's note each time a run's controller is gone (every trial ends so)"),
    IgnoreWarning(kinds=(RAY_PROCESS,), source="ray.data._internal.execution.interfaces.execution_options",
                  library=RAY, message=r"`ExecutionOptions\.exclude_resources` is deprecated",
                  category="builtins.DeprecationWarning", text="`ExecutionOptions.exclude_resources` is deprecated",
                  why="no upstream issue: Ray Data's own DatasetManager sets the option it deprecates"),
    # A Ray Train worker (its controller's level: Ray Train's LoggingConfig, ray #61550).
    LoggerLevel(kinds=(TRAIN_WORKER,), source="ray.train.v2.api.config", library=RAY, logger="ray.train",
                level="WARNING", applied_by="ray.train.LoggingConfig(log_level)", text="class LoggingConfig",
                why="ray #61550: Ray Train's INFO lines (worker-group starts, each checkpoint) would bury rayclip's"),
    SetEnv(kinds=(TRAIN_WORKER,), source="ray.train.v2._internal.constants", library=RAY,
           name="RAY_TRAIN_ENABLE_PRINT_PATCH", value="0",
           why="no upstream issue: Ray Train re-routes a worker's print() through its loggers and prints it too: twice"),
    DropRecords(kinds=(TRAIN_WORKER,), source="ray.train.v2._internal.execution.context", library=RAY,
                logger_is_file=True, prefixes=("Reporting training result",),
                why="no upstream issue: every report, on a logger named by file outside LoggingConfig's ray.train tree"),
    DropRecords(kinds=(TRAIN_WORKER,), source="ray.train.v2._internal.util", library=RAY, when=EXPLAINED_FAILURE,
                logger="ray.train.v2._internal.util", prefixes=("Error in training function",),
                why="no upstream issue: Ray's stack trace would bury the job's one-line cause of an explained failure"),
    DropRecords(kinds=(TRAIN_WORKER,), source="torch.utils.cpp_extension", library="torch 2.14.1",
                logger="torch.utils.cpp_extension", prefixes=("No CUDA runtime is found",),
                why="no upstream issue: loading DeepSpeed's CPU comm op, torch says a CPU worker has no CUDA"),
    DropPrinted(kinds=(TRAIN_WORKER,), source="deepspeed.comm.torch", library="deepspeed 0.19.8",
                prefix="DeepSpeed deepspeed.ops.comm.", text="print(f'DeepSpeed {builder.absolute_name()} built successfully')",
                why="no upstream issue: init_distributed prints that its CPU comm op loaded, on every worker"),
    IgnoreWarning(kinds=(TRAIN_WORKER,), source="torch.distributed.distributed_c10d", library="torch 2.14.1",
                  message=r".*torch\.distributed\.all_gather_into_tensor. is deprecated",
                  category="builtins.FutureWarning", text="torch.distributed.all_gather_into_tensor` is deprecated",
                  why="no upstream issue: DeepSpeed's ZeRO steps call torch's old all-gather name, a warning per step"),
    # Evaluation: in a driver and in the Train workers' in-loop evaluation.
    IgnoreWarning(kinds=(DRIVER, TRAIN_WORKER), source="torch.jit._serialization", library="torch 2.14.1",
                  message=r"`torch\.jit\.load` is deprecated", category="builtins.Warning",
                  text="`torch.jit.load` is deprecated",
                  why="no upstream issue: OpenAI released TorchScript archives; only their weights are read"),
    IgnoreWarning(kinds=(DRIVER, TRAIN_WORKER), source="torch._weights_only_unpickler", library="torch 2.14.1",
                  message="Detected pickle protocol", category="builtins.Warning", text="Detected pickle protocol",
                  why="no upstream issue: torch's note on a checkpoint's pickle protocol, nothing a user can act on"),
    IgnoreWarning(kinds=(DRIVER, TRAIN_WORKER), source="sklearn.utils.optimize", library="scikit-learn 1.9.1",
                  category="sklearn.exceptions.ConvergenceWarning",
                  text="failed to converge",
                  why="no upstream issue: an extreme C of the probe's sweep stops at max_iter, as the paper's protocol caps it"),
    # A driver running Ray Data itself.
    LoggerLevel(kinds=(DATA_DRIVER,), source="ray.data._internal.logging", library=RAY, logger="ray.data",
                level="WARNING", text='"ray.data"',
                why="no upstream issue: execution plans and progress log lines; the job prints its own line per set"),
    RayDataOption(kinds=(DATA_DRIVER,), source="ray.data.context", library=RAY, name="enable_progress_bars",
                  value=False, why="no upstream issue: the bars redraw over the job's own line per set (rate, ETA)"),
    DropRecords(kinds=(DATA_DRIVER,), source="ray.data._internal.execution.streaming_executor_state", library=RAY,
                logger="ray.data._internal.execution.streaming_executor_state",
                prefixes=("An exception was raised from a task",),
                why="no upstream issue: a failing task's exception reaches the driver, which reports it once"),
    DropRecords(kinds=(DATA_DRIVER,), source="ray.data.exceptions", library=RAY, logger="ray.data.exceptions",
                prefixes=("Exception occurred in Ray Data", "Full stack trace"),
                why="no upstream issue: the same exception, logged a second and third time by Ray Data"),
    IgnoreWarning(kinds=(DATA_DRIVER,), source="ray.data.dataset", library=RAY,
                  message=r"`ray_remote_args` is deprecated", category="builtins.Warning",
                  text="`ray_remote_args` is deprecated",
                  why="no upstream issue: map_batches names no parameter for max_restarts yet and deprecates the extra one"),
    # The Tune driver.
    SetEnv(kinds=(TUNE_DRIVER,), source="ray.tune.tune", library=RAY, name="RAY_AIR_NEW_OUTPUT", value="0",
           why="no upstream issue: the new console reporter's banner points at a TensorBoard folder in Ray's temp dir"),
    DropRecords(kinds=(TUNE_DRIVER,), source="ray.tune.execution.tune_controller", library=RAY,
                logger="ray.tune.execution.tune_controller", prefixes=("Trial task failed for trial",),
                why="no upstream issue: a failed trial's whole traceback; rayclip's error line and Tune's own say it once"),
    DropRecords(kinds=(TUNE_DRIVER,), source="ray.tune.tune", library=RAY, logger="ray.tune.tune",
                prefixes=("Trials did not complete",),
                why="no upstream issue: Tune's list of unfinished trials after a failed one"),
    # MLflow clients.
    DropRecords(kinds=(TRACKING,), source="mlflow.store.db.utils", library="mlflow 3.17.2",
                logger="mlflow.store.db.utils", prefixes=("Creating initial MLflow database tables",
                                                          "Updating database tables"),
                why="no upstream issue: a new local store announces its tables and migrations: routine, not news"),
    DropRecords(kinds=(TRACKING,), source="urllib3.connectionpool", library="urllib3 2.7.0",
                logger="urllib3.connectionpool", prefixes=("Retrying (Retry(",),
                text=("Retrying (%r) after connection broken",),
                why="no upstream issue: a warning per retry while a server is down; the outbox says so once"),
    DropRecords(kinds=(TRACKING,), source="mlflow.store.model_registry.abstract_store", library="mlflow 3.17.2",
                logger="mlflow.store.model_registry.abstract_store", prefixes=("Waiting up to",),
                why="no upstream issue: the registry waits for a new version's creation, milliseconds here"),
    # The pytest process.
    IgnoreWarning(kinds=(TESTS,), source="torchvision.io.image", library="torchvision 0.29.1",
                  message="The image decoding and encoding capabilities of TorchVision are deprecated",
                  category="builtins.DeprecationWarning",
                  text="The image decoding and encoding capabilities of TorchVision are deprecated",
                  why="no upstream issue: torchvision 0.29 deprecates torchvision.io for TorchCodec; rayclip's "
                      "decode_image uses it (torchvision is pinned below 0.30, where it still exists)"),
    IgnoreWarning(kinds=(TESTS,), source="sqlalchemy.orm.strategies", library="SQLAlchemy 2.1.9",
                  message="The ``noload`` loader strategy is deprecated", category="sqlalchemy.exc.SADeprecationWarning",
                  text="The ``noload`` loader strategy is deprecated",
                  why="no upstream issue: MLflow's SQL store still uses noload, deprecated in SQLAlchemy 2.1"),
    IgnoreWarning(kinds=(TESTS,), source="ray.data.context", library="ray 2.60.0",
                  message="`use_push_based_shuffle` is deprecated", category="builtins.DeprecationWarning", text="`use_push_based_shuffle` is deprecated!",
                  why="no upstream issue: DataContext warns whenever its deprecated field use_push_based_shuffle is assigned; "
                      "Ray Data assigns it itself (rayclip never does), seen in the pytest process only"),
    IgnoreWarning(kinds=(TESTS,), source="ray.data.context", library="ray 2.60.0",
                  message="`use_polars` is deprecated", category="builtins.DeprecationWarning", text="`use_polars` is deprecated, please configure",
                  why="no upstream issue: DataContext warns whenever its deprecated field use_polars is assigned; "
                      "Ray Data assigns it itself (rayclip never does), seen in the pytest process only"),
    IgnoreWarning(kinds=(TESTS,), source="ray.data.context", library="ray 2.60.0",
                  message="`use_arrow_tensor_v2` is deprecated", category="builtins.DeprecationWarning", text="`use_arrow_tensor_v2` is deprecated.",
                  why="no upstream issue: DataContext warns whenever its deprecated field use_arrow_tensor_v2 is assigned; "
                      "Ray Data assigns it itself (rayclip never does), seen in the pytest process only"),
)


def rules_for(kind: str, when: str | None = None) -> tuple[Rule, ...]:
    """The rows of ``kind`` (installed at the start when ``when`` is None)."""
    if kind not in KINDS:
        raise ValueError(f"unknown process kind {kind!r}; one of {', '.join(KINDS)}")
    return tuple(rule for rule in RULES if kind in rule.kinds and rule.when == when)


def env_for(kind: str) -> dict[str, str]:
    """The environment variables of ``kind``, for a runtime_env or a process's environment before its library starts."""
    return {rule.name: rule.value for rule in rules_for(kind) if isinstance(rule, SetEnv)}


def level_for(logger: str) -> str:
    """The level of ``logger`` that the library's own setting takes (``ray.init(logging_level=...)``)."""
    return next(rule.level for rule in RULES if isinstance(rule, LoggerLevel) and rule.logger == logger)


def warning_filters(kind: str) -> list[tuple[str, type[Warning]]]:
    """``(message regex, category)`` of the warnings of ``kind``."""
    return [(rule.message, rule.category_class()) for rule in rules_for(kind) if isinstance(rule, IgnoreWarning)]


def pytest_filters() -> list[str]:
    """Every kind's warnings as pytest ``filterwarnings`` lines: the tests run every kind's code in one process,
    and pytest re-enables DeprecationWarnings per test, over filters installed at import."""
    return [f"ignore:{rule.message}:{rule.category}" for rule in RULES if isinstance(rule, IgnoreWarning)]


def install(kind: str, when: str | None = None) -> None:
    """Install the rules of ``kind`` in this process (idempotent): record filters, logger levels, warning
    filters, environment variables (``setdefault``: an operator's own setting wins) and Ray's forwarded lines."""
    rules = rules_for(kind, when)
    for rule in rules:
        if isinstance(rule, DropRecords):
            drop_records(_logger_name(rule), *rule.prefixes)
        elif isinstance(rule, LoggerLevel) and rule.applied_by is None:
            logging.getLogger(rule.logger).setLevel(rule.level)
        elif isinstance(rule, SetEnv):
            os.environ.setdefault(rule.name, rule.value)
        elif isinstance(rule, RayDataOption):
            import ray.data

            setattr(ray.data.DataContext.get_current(), rule.name, rule.value)
        elif isinstance(rule, IgnoreWarning):
            warnings.filterwarnings("ignore", message=rule.message, category=rule.category_class())
    fragments = tuple(rule.fragment for rule in rules if isinstance(rule, DropForwarded))
    if fragments:
        drop_forwarded_lines(*fragments)


def install_ray_process() -> None:
    """Ray's ``worker_process_setup_hook`` on a local Ray rayclip starts."""
    install(RAY_PROCESS)


@contextlib.contextmanager
def printed_lines_dropped(kind: str) -> Iterator[None]:
    """A block whose library prints status lines to stdout: the ``DropPrinted`` lines of ``kind`` are dropped."""
    with without_printed_lines(*(rule.prefix for rule in rules_for(kind) if isinstance(rule, DropPrinted))):
        yield


def source_text(source: str) -> bytes:
    """The installed text (or binary) of a rule's ``source``: a module's file, or ``package:relative/path``."""
    package, _, relative = source.partition(":")
    origin = importlib.util.find_spec(package).origin
    path = os.path.join(os.path.dirname(origin), relative) if relative else origin
    with open(path, "rb") as file:
        return file.read()


def _logger_name(rule: DropRecords) -> str:
    return importlib.util.find_spec(rule.source).origin if rule.logger_is_file else rule.logger
