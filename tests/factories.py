"""What several test modules build the same way: token batches, MLflow metric histories, tracking settings,
and a capture of rayclip's log records."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

SOS, EOS = 49406, 49407


def random_batch(rows: int, *, seed: int = 0, image_size: int = 32, lengths: tuple[int, int] = (3, 12),
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (rows, 3, R, R) and captions (rows, 77) of [SOS] ids [EOS] with lengths in [lo, hi)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(rows, 3, image_size, image_size, generator=generator)
    tokens = torch.zeros(rows, 77, dtype=torch.long)
    for row, length in enumerate(torch.randint(*lengths, (rows,), generator=generator).tolist()):
        tokens[row, 0] = SOS
        tokens[row, 1 : length - 1] = torch.randint(300, 5000, (length - 2,), generator=generator)
        tokens[row, length - 1] = EOS
    return images, tokens


def parameter_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter gradient the last backward produced, by parameter name."""
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def metric_history(tracking_uri: str, run_id: str, key: str) -> dict[int, float]:
    """A run's metric by step, read back from MLflow; a step logged twice fails the test."""
    metrics = MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, key)
    steps = [m.step for m in metrics]
    assert len(steps) == len(set(steps)), f"{key} logged twice for a step: {sorted(steps)}"
    return {m.step: m.value for m in metrics}


@dataclass
class TrackingSettings:
    """The ``tracking`` config section as ``RunTracker.from_config`` reads it."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "unit"
    run_name: str | None = None
    register_model_name: str | None = None
    log_every_steps: int = 1
    system_metrics: bool = False
    artifact_location: str | None = None


@contextlib.contextmanager
def rayclip_records(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> Iterator[list[logging.LogRecord]]:
    """rayclip's log records at ``level`` and above while the block runs (the ``rayclip`` logger does
    not propagate once a job has set up logging, so pytest's capture is attached to it directly)."""
    root = logging.getLogger("rayclip")
    root.addHandler(caplog.handler)
    saved = root.level, root.propagate
    root.setLevel(level)
    root.propagate = False  # counted once, by the handler attached here
    try:
        yield caplog.records
    finally:
        root.removeHandler(caplog.handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]


def write_export_file(path: Path) -> dict[str, torch.Tensor]:
    """A small state dict saved where an exported model would be (what the tracker uploads)."""
    state = {"logit_scale": torch.tensor(4.6052), "text_projection": torch.randn(8, 4)}
    torch.save(state, path)
    return state


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of a run, recursively."""
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def assert_registered(client: MlflowClient, name: str, run_id: str, file_name: str = "clip_rn50.pt") -> None:
    """The registry holds exactly one version of ``name``, made from this run's ``model/`` artifact."""
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1
    assert versions[0].run_id == run_id
    assert versions[0].source == f"runs:/{run_id}/model"
    assert versions[0].tags["state_dict_file"] == file_name
