"""``--model``: a rayclip run or checkpoint, or an OpenAI-layout file, turned into a model (the evaluation driver).

Accepted, tried in this order (local paths and ``s3://`` URLs alike):

* a file: an OpenAI-layout state dict (rayclip's export ``openai_model.pt``, or one of OpenAI's released
  checkpoints as a state dict) or a TorchScript archive (how OpenAI released them); the architecture is read
  off the weights;
* a checkpoint folder (``train_state.json`` inside): its export when it has one (a run's final checkpoint),
  else its DeepSpeed ZeRO partitions consolidated into one fp32 state dict;
* a run folder (Ray Train's ``checkpoint_manager_snapshot.json`` inside): its latest checkpoint;
* a run name: that run under ``checkpoint.storage_path``.

A checkpoint remembers its MLflow run, so its evaluation is logged into the training run.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch

from models import CLIP, load_openai_checkpoint, to_openai_layout
from orchestrator import runs, storage
from orchestrator.config import RunConfig


class ModelSourceError(ValueError):
    """``--model`` names nothing loadable; the message names the file or run and why."""


@dataclass
class LoadedModel:
    model: CLIP
    source: str
    """The file, checkpoint or run it came from (a URL or absolute path)."""
    kind: str
    """What it was: "OpenAI-layout state dict", "TorchScript archive", "rayclip checkpoint", ..."""
    mlflow_run_id: str | None = None
    step: int | None = None


def load_model(spec: str, cfg: RunConfig, *, argument: str = "--model") -> LoadedModel:
    """The model ``spec`` names; raises :class:`ModelSourceError` naming what was tried, ``spec`` as the
    ``argument`` it came from (the evaluation's ``--model``, a run's ``model.init_from``)."""
    endpoint = cfg.checkpoint.s3_endpoint_url
    location = storage.resolve(spec, endpoint) if (spec.startswith("s3://") or os.path.exists(spec)) else None
    if location is not None:
        kind = location.fs.get_file_info(location.path).type
        if kind == pafs.FileType.File:
            return load_model_file(location)
        if kind == pafs.FileType.Directory:
            return _load_folder(location)
        raise ModelSourceError(f"{argument} {spec}: no such file or folder")
    run = runs.run_location(cfg.checkpoint.storage_path, endpoint, spec)
    if runs.run_exists(run):
        return _load_folder(run)
    raise ModelSourceError(f"{argument} {spec!r}: not a file, a checkpoint or run folder, or a run under "
                           f"checkpoint.storage_path={cfg.checkpoint.storage_path} (set it with --set or --config)")


def load_model_file(location: storage.Location) -> LoadedModel:
    """An OpenAI-layout state dict or TorchScript archive (local or S3)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = location.path
        if location.is_s3:
            path = os.path.join(scratch, os.path.basename(location.path))
            with open(path, "wb") as handle:
                handle.write(storage.read_bytes(location))
        scripted = _is_torchscript(path)
        kind = "TorchScript archive" if scripted else "OpenAI-layout state dict"
        try:
            with warnings.catch_warnings():
                # OpenAI released TorchScript archives; reading their weights is all that is asked of it here.
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated")
                state = torch.jit.load(path, map_location="cpu").state_dict() if scripted else torch.load(
                    path, map_location="cpu", weights_only=True)
            if not isinstance(state, Mapping):
                raise TypeError(f"the file holds a {type(state).__name__}, not a state dict")
            model = load_openai_checkpoint(state)
        except Exception as error:  # what a wrong file raises varies: unpickling, a missing key, a bad shape
            raise ModelSourceError(f"{location.url}: neither a TorchScript archive nor a state dict in OpenAI's CLIP "
                                   f"layout ({type(error).__name__}: {error})") from None
    return LoadedModel(model.eval(), location.url, kind)


def _is_torchscript(path: str) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name.endswith("/code/__torch__.py") for name in archive.namelist())


def _load_folder(folder: storage.Location) -> LoadedModel:
    if storage.exists(folder.child(runs.RUN_SNAPSHOT)):
        latest = runs.latest_checkpoint(folder)
        if latest is None:
            raise ModelSourceError(f"{folder.url}: the run has no checkpoint yet")
        folder = latest
    state_file = folder.child(runs.STATE_FILE)
    if not storage.exists(state_file):
        raise ModelSourceError(f"{folder.url}: not a rayclip checkpoint ({runs.STATE_FILE} missing) nor a run folder "
                               f"({runs.RUN_SNAPSHOT} missing)")
    state = json.loads(storage.read_bytes(state_file))
    export = folder.child(runs.EXPORT_FILE)
    if storage.exists(export):
        loaded = load_model_file(export)
        loaded.kind = f"rayclip checkpoint (its {runs.EXPORT_FILE})"
    else:
        loaded = LoadedModel(_consolidate_zero(folder), folder.url, "rayclip checkpoint (ZeRO partitions consolidated)")
    loaded.source = folder.url
    loaded.mlflow_run_id, loaded.step = state.get("mlflow_run_id"), state.get("step")
    return loaded


def _consolidate_zero(folder: storage.Location) -> CLIP:
    """One fp32 model from every rank's DeepSpeed partition (DeepSpeed's own ``zero_to_fp32``, on the CPU)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        local = folder.path
        if folder.is_s3:
            pafs.copy_files(folder.child(runs.DEEPSPEED_TAG).path, os.path.join(scratch, runs.DEEPSPEED_TAG),
                            source_filesystem=folder.fs, destination_filesystem=pafs.LocalFileSystem())
            local = scratch
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(local, tag=runs.DEEPSPEED_TAG)
        except (FileNotFoundError, ValueError, RuntimeError) as error:
            raise ModelSourceError(f"{folder.url}/{runs.DEEPSPEED_TAG}: cannot consolidate the DeepSpeed checkpoint "
                                   f"({type(error).__name__}: {error})") from None
    return load_openai_checkpoint(to_openai_layout({key: value.float() for key, value in state.items()})).eval()


def describe(loaded: LoadedModel) -> str:
    spec = loaded.model.spec
    where = f", step {loaded.step}" if loaded.step is not None else ""
    params = sum(p.numel() for p in loaded.model.parameters())
    return f"model {spec.name} ({params / 1e6:.1f}M parameters, {spec.vision.image_size} px) from {loaded.kind} {loaded.source}{where}"

