"""A run's identity and its checkpoints' integrity, on real folders: unique names, a reservation only one job wins,
manifests that tell a complete checkpoint from a damaged or unfinished one, the choice of where a run resumes,
and which errors a restart can heal."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import ray.exceptions
import torch

from orchestrator import runs
from orchestrator.data import DataErrorBudgetExceeded
from orchestrator.failures import CannotHeal, cannot_heal, explains_itself
from orchestrator.train import CheckpointDamaged, CheckpointNotSaved, NonFiniteLossError


def write_checkpoint(run: runs.storage.Location, step: int, *, attempt: int = 1, manifest: bool = True,
                     sizes: tuple[int, ...] = (3000, 500)) -> Path:
    """A checkpoint folder as a save leaves it: a few files, then (unless cut short) the manifest."""
    folder = Path(run.path) / runs.checkpoint_dir_name(step, attempt)
    (folder / "ds").mkdir(parents=True)
    for rank, size in enumerate(sizes):
        (folder / "ds" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(os.urandom(size))
    (folder / runs.STATE_FILE).write_text(json.dumps({"step": step}))
    if manifest:
        location = run.child(folder.name)
        runs.write_manifest(location, step, len(sizes), runs.describe_files(str(folder)))
    return folder


@pytest.fixture
def run(tmp_path):
    location = runs.run_location(str(tmp_path), None, "r")
    Path(location.path).mkdir()
    return location


def test_a_complete_checkpoint_has_a_manifest_of_every_file(run):
    folder = write_checkpoint(run, 4)
    manifest = json.loads((folder / runs.MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"ds/zero_pp_rank_0_optim_states.pt", "ds/zero_pp_rank_1_optim_states.pt",
                                      runs.STATE_FILE}
    assert manifest["files"]["ds/zero_pp_rank_0_optim_states.pt"]["size"] == 3000
    [info] = runs.list_checkpoints(run)
    assert (info.name, info.step, info.problem, info.verified) == ("checkpoint_step_00000004", 4, None, True)


def test_a_file_cut_short_or_missing_is_named_with_what_is_wrong(run):
    cut = write_checkpoint(run, 4) / "ds" / "zero_pp_rank_0_optim_states.pt"
    cut.write_bytes(cut.read_bytes()[:1500])
    (write_checkpoint(run, 8) / runs.STATE_FILE).unlink()
    problems = {c.step: c.problem for c in runs.list_checkpoints(run)}
    assert problems == {4: "ds/zero_pp_rank_0_optim_states.pt is 1,500 bytes, the manifest says 3,000 bytes",
                        8: f"1 file(s) missing: {runs.STATE_FILE}"}


def test_a_save_that_never_finished_has_no_manifest_and_is_incomplete(run):
    write_checkpoint(run, 4)
    write_checkpoint(run, 8, manifest=False)
    chosen, passed_over = runs.resume_checkpoint(run)
    assert chosen.step == 4
    assert [(c.step, c.incomplete, c.problem) for c in passed_over] == [(8, True, "no manifest: the save did not finish")]


def test_checksums_find_a_changed_byte_that_sizes_cannot(run):
    folder = write_checkpoint(run, 4)
    manifest = json.loads((folder / runs.MANIFEST_FILE).read_text())
    names = sorted(manifest["files"])
    assert runs.checksum_problems(str(folder), manifest, names) == []
    damaged = folder / "ds" / "zero_pp_rank_1_optim_states.pt"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert runs.list_checkpoints(run)[0].problem is None  # same size: only the checksum sees it
    assert runs.checksum_problems(str(folder), manifest, names) == [
        "ds/zero_pp_rank_1_optim_states.pt: its SHA-256 differs from the manifest's (the file was changed or damaged)"]


def test_the_newest_intact_checkpoint_is_chosen_and_a_damaged_one_is_marked_once(run):
    write_checkpoint(run, 4)
    cut = write_checkpoint(run, 8) / "ds" / "zero_pp_rank_1_optim_states.pt"
    cut.write_bytes(b"")
    chosen, passed_over = runs.resume_checkpoint(run)
    assert chosen.step == 4 and [(c.step, c.marked) for c in passed_over] == [(8, False)]
    runs.mark_damaged(passed_over[0].location, passed_over[0].problem)
    chosen, passed_over = runs.resume_checkpoint(run)
    assert chosen.step == 4 and [(c.step, c.marked, c.incomplete) for c in passed_over] == [(8, True, False)]
    assert "the manifest says 500 bytes" in passed_over[0].problem


def test_a_step_saved_again_gets_its_own_folder_and_wins(run):
    write_checkpoint(run, 4)
    (write_checkpoint(run, 8) / runs.STATE_FILE).unlink()
    write_checkpoint(run, 8, attempt=2)
    chosen, _ = runs.resume_checkpoint(run)
    assert chosen.name == "checkpoint_step_00000008-2" and chosen.step == 8


def test_a_from_step_pin_keeps_the_abandoned_later_checkpoints_out_until_a_newer_save(run):
    write_checkpoint(run, 4)
    write_checkpoint(run, 8)
    runs.update_record(run, pinned={"step": 4, "at": time.time(), "checkpoint": "checkpoint_step_00000004"})
    chosen, passed_over = runs.resume_checkpoint(run)
    assert chosen.step == 4 and passed_over == []
    time.sleep(0.01)
    write_checkpoint(run, 8, attempt=2)  # the resumed course saves step 8 again, after the pin
    chosen, _ = runs.resume_checkpoint(run)
    assert chosen.name == "checkpoint_step_00000008-2"


def test_run_names_differ_within_one_second():
    names = {runs.unique_run_name("rayclip-local") for _ in range(50)}
    assert len(names) > 40  # 4 hex digits: a collision among 50 is rare, and a reservation refuses it anyway
    assert all(name.startswith("rayclip-local-") and len(name.split("-")[-1]) == 4 for name in names)


def _reserve(path: str, start: float, queue) -> None:
    while time.time() < start:
        time.sleep(0.001)
    try:
        runs.reserve(runs.storage.resolve(path), {"name": "same"})
        queue.put("won")
    except runs.RunFolderTaken:
        queue.put("taken")


def test_of_several_jobs_reserving_one_name_at_the_same_moment_exactly_one_wins(tmp_path):
    folder = str(tmp_path / "runs" / "same")
    queue = multiprocessing.get_context("spawn").Queue()
    start = time.time() + 2.0
    jobs = [multiprocessing.get_context("spawn").Process(target=_reserve, args=(folder, start, queue)) for _ in range(6)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=60)
    outcomes = sorted(queue.get(timeout=5) for _ in jobs)
    assert outcomes == ["taken"] * 5 + ["won"]
    assert json.loads((Path(folder) / runs.RUN_RECORD).read_text())["name"] == "same"
    with pytest.raises(runs.RunFolderTaken):
        runs.reserve(runs.storage.resolve(folder), {"name": "later"})


class _WrappedByRay(Exception):
    """Ray Train hands the controller a worker's error wrapped like this (the original in ``_base_exc``)."""

    def __init__(self, error: BaseException):
        super().__init__("Traceback ...")
        self._base_exc = error


@pytest.mark.parametrize("error", [
    DataErrorBudgetExceeded("data error budget exceeded in epoch 0: 600 bad or lost samples"),
    NonFiniteLossError("3 consecutive steps had a NaN/inf loss"),
    CheckpointNotSaved("the step-4 checkpoint was not saved (no space left)"),
    OSError(errno.ENOSPC, "No space left on device", "/mnt/full/x.pt"),
    _WrappedByRay(RuntimeError("saving failed")),  # its cause set below
    TypeError("unsupported operand type(s)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),  # the same batch will not fit again
])
def test_errors_a_restart_cannot_heal_are_named_in_one_line(error):
    if isinstance(error, _WrappedByRay):
        error._base_exc.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    reason = cannot_heal(error)
    assert reason and "\n" not in reason
    assert explains_itself(error) is not isinstance(error, TypeError)  # a code error keeps its stack trace


@pytest.mark.parametrize("error", [
    ConnectionResetError("Connection reset by peer"),
    RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4412"),
    CheckpointDamaged("checkpoint_step_00000008 is damaged: ds/x.pt: its SHA-256 differs"),
    TimeoutError("S3 read timed out"),
    ray.exceptions.OutOfMemoryError("Memory on the node was 21.68GB used / 23.54GB limit"),  # host RAM: others' load
])
def test_errors_a_restart_may_heal_are_left_to_ray_trains_retries(error):
    assert cannot_heal(error) is None and cannot_heal(_WrappedByRay(error)) is None


def test_cannot_heal_is_the_mark_of_the_errors_that_stop_a_run():
    assert all(issubclass(kind, CannotHeal) for kind in (DataErrorBudgetExceeded, NonFiniteLossError, CheckpointNotSaved))
    assert not issubclass(CheckpointDamaged, CannotHeal)
