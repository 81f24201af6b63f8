"""``--model``: OpenAI-layout files (state dict or TorchScript), rayclip checkpoint and run folders, and what
is refused, each refusal naming the file."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from models import create_model
from orchestrator import runs, storage
from orchestrator.config import load_config
from orchestrator.eval import ModelSourceError, load_model, load_model_file

# OpenAI released TorchScript archives; making one is the only way to test reading one.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def openai_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("ViT-tiny").openai_state_dict()


class Holder(nn.Module):
    """A module that only holds tensors (TorchScript needs a ``forward`` to script it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def scripted_archive(state: dict[str, torch.Tensor], path) -> None:
    """A TorchScript archive whose ``state_dict()`` is ``state``, the way OpenAI's JIT checkpoints are:
    nested modules named by the dotted keys, plus the resolution/context/vocabulary entries."""
    root = Holder()
    for key, value in state.items():
        *modules, leaf = key.split(".")
        parent = root
        for name in modules:
            if not hasattr(parent, name):
                parent.add_module(name, Holder())
            parent = getattr(parent, name)
        parent.register_buffer(leaf, value.clone())
    torch.jit.script(root).save(str(path))


def assert_same_weights(model, state: dict[str, torch.Tensor]) -> None:
    loaded = model.openai_state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_a_state_dict_file_loads_with_its_architecture_read_off_the_weights(openai_state, tmp_path):
    path = tmp_path / "openai_model.pt"
    torch.save(openai_state, path)
    loaded = load_model_file(storage.resolve(str(path)))
    assert (loaded.kind, loaded.source, loaded.model.spec.name) == ("OpenAI-layout state dict", str(path), "ViT-tiny")
    assert not loaded.model.training
    assert_same_weights(loaded.model, openai_state)
    assert (loaded.mlflow_run_id, loaded.step) == (None, None)


def test_a_torchscript_archive_loads_like_openais_released_files(openai_state, tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    metadata = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                "vocab_size": torch.tensor(49408)}
    scripted_archive({**openai_state, **metadata}, path)
    loaded = load_model_file(storage.resolve(str(path)))
    assert (loaded.kind, loaded.model.spec.name) == ("TorchScript archive", "ViT-tiny")
    assert_same_weights(loaded.model, openai_state)


def test_a_torchscript_archive_whose_metadata_disagrees_names_the_file(openai_state, tmp_path):
    path = tmp_path / "odd.pt"
    scripted_archive({**openai_state, "input_resolution": torch.tensor(64)}, path)
    with pytest.raises(ModelSourceError) as error:
        load_model_file(storage.resolve(str(path)))
    assert str(path) in str(error.value) and "input_resolution=64" in str(error.value)


def write_text(path):
    path.write_text("weights: none\n")


def write_unrelated_torch_dict(path):
    torch.save({"encoder.weight": torch.zeros(2, 2), "step": 3}, path)


def write_plain_pickle(path):
    with open(path, "wb") as handle:
        pickle.dump({"learning_rate": 0.1, "layers": [1, 2]}, handle)


def write_tensor(path):
    torch.save(torch.zeros(3), path)


def write_module(path):
    torch.save(nn.Linear(2, 2), path)


def write_random_bytes(path):
    path.write_bytes(bytes(range(7, 17)))


@pytest.mark.parametrize("write, reason", [
    (write_text, ""),
    (write_unrelated_torch_dict, ""),
    pytest.param(write_plain_pickle, "", marks=pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")),
    (write_tensor, ""),
    (write_module, "it pickles Python objects such as torch.nn.modules.linear.Linear"),
    (write_random_bytes, "not a PyTorch file"),
])
def test_a_file_that_is_not_a_clip_model_is_refused_naming_it_without_unsafe_advice(write, reason, tmp_path):
    """PyTorch's own message for pickled objects or noise suggests ``weights_only=False``, which would run a
    stranger's code."""
    path = tmp_path / "model.pt"
    write(path)
    with pytest.raises(ModelSourceError) as error:
        load_model_file(storage.resolve(str(path)))
    message = str(error.value)
    assert message.startswith(f"--model {path}: neither an OpenAI-layout state dict nor a TorchScript archive")
    assert reason in message and len(message.splitlines()) == 1 and "weights_only" not in message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_model_file_cut_in_half_is_called_damaged_or_truncated(openai_state, legacy, tmp_path):
    whole, path = tmp_path / "whole.pt", tmp_path / "openai_model.pt"
    torch.save(openai_state, whole, _use_new_zipfile_serialization=not legacy)
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSourceError) as error:
        load_model_file(storage.resolve(str(path)), argument="model.init_from")
    assert str(error.value).startswith(f"model.init_from {path}: damaged or truncated")


def test_an_empty_file_is_named_empty(tmp_path):
    path = tmp_path / "openai_model.pt"
    path.touch()
    with pytest.raises(ModelSourceError, match=r"^--model .*openai_model\.pt: the file is empty"):
        load_model_file(storage.resolve(str(path)))


def test_a_damaged_train_state_names_the_file(openai_state, tmp_path):
    folder = tmp_path / "checkpoint_000003"
    checkpoint_folder(folder, openai_state, step=3)
    (folder / runs.STATE_FILE).write_text("{step: 3")
    with pytest.raises(ModelSourceError) as error:
        load_model(str(folder), load_config())
    assert str(error.value) == f"--model {folder / runs.STATE_FILE}: not a JSON object (a damaged checkpoint)"


def checkpoint_folder(folder, state: dict[str, torch.Tensor] | None, **train_state) -> None:
    folder.mkdir(parents=True)
    (folder / runs.STATE_FILE).write_text(json.dumps(train_state))
    if state is not None:
        torch.save(state, folder / runs.EXPORT_FILE)


def test_a_checkpoint_folder_loads_its_export_and_remembers_its_run(openai_state, tmp_path):
    folder = tmp_path / "checkpoint_000003"
    checkpoint_folder(folder, openai_state, mlflow_run_id="0123abcd", step=600, epoch=1)
    loaded = load_model(str(folder), load_config())
    assert (loaded.mlflow_run_id, loaded.step, loaded.source) == ("0123abcd", 600, str(folder))
    assert loaded.kind == f"rayclip checkpoint (its {runs.EXPORT_FILE})"
    assert_same_weights(loaded.model, openai_state)


def test_a_run_folder_and_a_run_name_load_the_newest_intact_checkpoint(openai_state, tmp_path):
    run = tmp_path / "checkpoints" / "rayclip-local-1"
    for step, state in ((10, None), (20, openai_state), (30, openai_state)):
        checkpoint_folder(run / runs.checkpoint_dir_name(step), state, mlflow_run_id=f"r{step}", step=step)
        location = runs.storage.resolve(str(run / runs.checkpoint_dir_name(step)))
        runs.write_manifest(location, step, 1, runs.describe_files(location.path))
    (run / runs.RUN_SNAPSHOT).write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": runs.checkpoint_dir_name(30)}}))
    newest = run / runs.checkpoint_dir_name(30) / runs.EXPORT_FILE
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short: the run's newest intact checkpoint is step 20
    cfg = load_config(overrides=[f"checkpoint.storage_path={tmp_path / 'checkpoints'}"])
    for spec in (str(run), "rayclip-local-1"):
        loaded = load_model(spec, cfg)
        expected = (str(run / runs.checkpoint_dir_name(20)), 20, "r20")
        assert (loaded.source, loaded.step, loaded.mlflow_run_id) == expected
    with pytest.raises(ModelSourceError, match=r"a damaged checkpoint \(openai_model\.pt is 1,000 bytes, the manifest"):
        load_model(str(run / runs.checkpoint_dir_name(30)), cfg)


def test_a_folder_that_is_neither_a_checkpoint_nor_a_run_is_refused(tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(ModelSourceError) as error:
        load_model(str(folder), load_config())
    message = str(error.value)
    assert message.startswith(f"--model {folder}: a folder that is neither") and f"{runs.STATE_FILE} missing" in message
    assert runs.RUN_SNAPSHOT in message


def test_a_name_that_is_no_file_and_no_run_names_where_runs_are_looked_for(tmp_path):
    cfg = load_config(overrides=[f"checkpoint.storage_path={tmp_path}"])
    with pytest.raises(ModelSourceError) as error:
        load_model("no-such-run", cfg)
    assert "'no-such-run'" in str(error.value) and f"checkpoint.storage_path={tmp_path}" in str(error.value)
