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
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch

from models import CLIP, load_openai_checkpoint, to_openai_layout
from orchestrator import runs, storage
from orchestrator.config import RunConfig


class ModelSourceError(ValueError):
    """``--model`` names nothing loadable; the message names the file or run and why."""


NOT_A_MODEL = "neither an OpenAI-layout state dict nor a TorchScript archive of CLIP"


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
    try:
        return _load(spec, cfg, argument)
    except OSError as error:  # storage that cannot be read: an unreachable endpoint, no permission
        raise ModelSourceError(f"{argument} {spec}: cannot be read ({_one_line(error)})") from None


def _load(spec: str, cfg: RunConfig, argument: str) -> LoadedModel:
    endpoint = cfg.checkpoint.s3_endpoint_url
    location = storage.resolve(spec, endpoint) if (spec.startswith("s3://") or os.path.exists(spec)) else None
    if location is not None:
        kind = location.fs.get_file_info(location.path).type
        if kind == pafs.FileType.File:
            return load_model_file(location, argument=argument)
        if kind == pafs.FileType.Directory:
            return _load_folder(location, argument)
        raise ModelSourceError(f"{argument} {spec}: no such file or folder")
    run = runs.run_location(cfg.checkpoint.storage_path, endpoint, spec)
    if runs.run_exists(run):
        return _load_folder(run, argument)
    raise ModelSourceError(f"{argument} {spec!r}: not a file, a checkpoint or run folder, or a run under "
                           f"checkpoint.storage_path={cfg.checkpoint.storage_path} (set it with --set or --config)")


def load_model_file(location: storage.Location, *, argument: str = "--model") -> LoadedModel:
    """An OpenAI-layout state dict or TorchScript archive (local or S3); a refusal is one line naming
    ``argument`` and the file. Nothing but tensors is unpickled (``weights_only=True``), so a file from
    anywhere cannot run code here."""
    where = f"{argument} {location.url}"
    with tempfile.TemporaryDirectory() as scratch:
        path = location.path
        if location.is_s3:
            path = os.path.join(scratch, os.path.basename(location.path))
            with open(path, "wb") as handle:
                handle.write(storage.read_bytes(location))
        scripted = _is_torchscript(path)
        state = _read_tensors(path, scripted, where)
    try:
        model = load_openai_checkpoint(state)
    except Exception as error:  # what a wrong state dict raises varies: a missing key, a bad shape, odd metadata
        raise ModelSourceError(f"{where}: {NOT_A_MODEL} ({_not_clip(error)})") from None
    return LoadedModel(model.eval(), location.url, "TorchScript archive" if scripted else "OpenAI-layout state dict")


def _read_tensors(path: str, scripted: bool, where: str) -> Mapping[str, torch.Tensor]:
    """The file's tensors by name, or a :class:`ModelSourceError` saying what the file is instead."""
    if os.path.getsize(path) == 0:
        raise ModelSourceError(f"{where}: the file is empty; expected an OpenAI-layout state dict or a TorchScript "
                               "archive")
    if _is_cut_zip(path):
        raise ModelSourceError(f"{where}: damaged or truncated (a zip archive whose end is missing: a save, copy or "
                               "download cut short?)")
    try:
        state = torch.jit.load(path, map_location="cpu").state_dict() if scripted else torch.load(
            path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises a different type for every kind of wrong file
        raise ModelSourceError(f"{where}: {_unreadable(error, scripted)}") from None
    if not isinstance(state, Mapping):
        raise ModelSourceError(f"{where}: {NOT_A_MODEL} (the file holds a {type(state).__name__}, not a state dict)")
    odd = next((key for key, value in state.items() if not isinstance(value, torch.Tensor)), None)
    if odd is not None:
        raise ModelSourceError(f"{where}: {NOT_A_MODEL} (its entry {odd!r} is not a tensor but "
                               f"{type(state[odd]).__name__})")
    return state


def _unreadable(error: Exception, scripted: bool) -> str:
    """What a failed read says about the file, in our words: torch's run to several lines and, for pickled
    objects, suggest ``weights_only=False``, which would let an untrusted file run code."""
    text = str(error)
    if isinstance(error, EOFError) or any(sign in text for sign in ("unexpected EOF", "truncated", "corrupted")):
        return "damaged or truncated (the file ends early or its contents are corrupt)"
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if pickled:
        return (f"{NOT_A_MODEL} (it pickles Python objects such as {pickled.group(1)}; only tensors are read "
                "from a model file, since unpickling objects can run code)")
    if scripted:
        return "a TorchScript archive that cannot be loaded (damaged, or written by an incompatible PyTorch)"
    return f"{NOT_A_MODEL} (not a PyTorch file)"


def _not_clip(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"a state dict without OpenAI CLIP's {error.args[0]!r}"
    return _one_line(error)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name.endswith("/code/__torch__.py") for name in archive.namelist())


def _is_cut_zip(path: str) -> bool:
    """A zip archive's start without its central directory at the end: a file cut short."""
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def _load_folder(folder: storage.Location, argument: str) -> LoadedModel:
    where = f"{argument} {folder.url}"
    if storage.exists(folder.child(runs.RUN_SNAPSHOT)) or storage.exists(folder.child(runs.RUN_RECORD)):
        latest, passed_over = runs.resume_checkpoint(folder)
        if latest is None:
            damage = "; ".join(f"{c.name}: {c.problem}" for c in passed_over if not c.incomplete)
            raise ModelSourceError(f"{where}: the run has no intact checkpoint" + (f" ({damage})" if damage else " yet"))
        folder = latest.location
    elif storage.exists(folder.child(runs.MANIFEST_FILE)):
        problem = runs.checkpoint_info(folder).problem
        if problem:
            raise ModelSourceError(f"{where}: a damaged checkpoint ({problem})")
    state_file = folder.child(runs.STATE_FILE)
    if not storage.exists(state_file):
        raise ModelSourceError(f"{where}: a folder that is neither a rayclip checkpoint ({runs.STATE_FILE} missing) "
                               f"nor a run folder ({runs.RUN_SNAPSHOT} missing)")
    try:
        state = json.loads(storage.read_bytes(state_file))
    except ValueError:
        state = None
    if not isinstance(state, dict):
        raise ModelSourceError(f"{argument} {state_file.url}: not a JSON object (a damaged checkpoint)")
    export = folder.child(runs.EXPORT_FILE)
    if storage.exists(export):
        loaded = load_model_file(export, argument=argument)
        loaded.kind = f"rayclip checkpoint (its {runs.EXPORT_FILE})"
    else:
        loaded = LoadedModel(_consolidate_zero(folder, argument), folder.url,
                             "rayclip checkpoint (ZeRO partitions consolidated)")
    loaded.source = folder.url
    loaded.mlflow_run_id, loaded.step = state.get("mlflow_run_id"), state.get("step")
    return loaded


def _consolidate_zero(folder: storage.Location, argument: str) -> CLIP:
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
            raise ModelSourceError(f"{argument} {folder.url}/{runs.DEEPSPEED_TAG}: cannot consolidate the DeepSpeed "
                                   f"checkpoint ({type(error).__name__}: {_one_line(error)})") from None
    return load_openai_checkpoint(to_openai_layout({key: value.float() for key, value in state.items()})).eval()


def describe(loaded: LoadedModel) -> str:
    spec = loaded.model.spec
    where = f", step {loaded.step}" if loaded.step is not None else ""
    params = sum(p.numel() for p in loaded.model.parameters())
    return f"model {spec.name} ({params / 1e6:.1f}M parameters, {spec.vision.image_size} px) from {loaded.kind} {loaded.source}{where}"

