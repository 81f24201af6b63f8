"""Where a pretraining run lives in storage, which name it has, and which of its checkpoints can be trusted.
A leaf: it imports nothing of rayclip's but ``storage``.

    <checkpoint.storage_path>/<run name>/
        rayclip_run.json                     the run's reservation: written first, exclusively (a name is never reused)
        checkpoint_manager_snapshot.json     Ray Train v2's record of the run's reported checkpoints
        checkpoint_step_00000100/            one folder per saved checkpoint (``checkpoint_dir_name``)
            ds/                              DeepSpeed's files (every rank's ZeRO partition)
            train_state.json                 step, data position, MLflow run id, ...
            openai_model.pt                  the final checkpoint's consolidated model, OpenAI's layout
            manifest.json                    every file above with its size and SHA-256, written last

A checkpoint is complete when its manifest exists: it is written after every rank's files are in storage, so
a save cut short by a full disk, a crash or a lost node leaves a folder without one. Checkpoints written
before manifests existed count when Ray Train's snapshot lists them (unverified). The run resumes from the
newest complete checkpoint (:func:`resume_checkpoint`); ``--from-step`` pins an older one until a newer
save supersedes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from orchestrator import storage

RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # written by Ray Train v2 beside the checkpoints
RUN_RECORD = "rayclip_run.json"
DEEPSPEED_TAG = "ds"
STATE_FILE = "train_state.json"
EXPORT_FILE = "openai_model.pt"
MANIFEST_FILE = "manifest.json"
FIRST_STEP_AT = "time/first_step_unix_s"
"""A key of the metrics a run reports to Ray Train (not MLflow): the wall-clock time its worker group (the latest,
after a restart) ended its first step; Tune's driver prints from it what each trial's start cost."""
DAMAGE_NOTE = "damaged.json"  # written beside a checkpoint whose checksums failed when it was loaded
_CHECKPOINT_DIR = re.compile(r"checkpoint_step_(\d{8})(?:-(\d+))?")


def checkpoint_dir_name(step: int, attempt: int = 1) -> str:
    """The folder of the checkpoint saved after optimizer step ``step``; a step saved again (after a resume from
    an older checkpoint) gets ``-2``, ``-3``, ... so no folder is ever written twice."""
    return f"checkpoint_step_{step:08d}" + (f"-{attempt}" if attempt > 1 else "")


def unique_run_name(base: str) -> str:
    """``<base>-<UTC time>-<4 random hex digits>``: two runs started in the same second still differ."""
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def storage_root(storage_path: str, endpoint_url: str | None = None) -> storage.Location:
    """``checkpoint.storage_path`` as the filesystem Ray Train writes through (boto3 writes on S3)."""
    if not storage_path.startswith("s3://"):
        return storage.resolve(storage_path)
    path = storage_path.removeprefix("s3://").strip("/")
    # The driver's region travels with the filesystem, so every worker node writes to the same one.
    return storage.Location(storage.s3_checkpoint_filesystem(endpoint_url), path, "s3://" + path, endpoint_url)


def run_location(storage_path: str, endpoint_url: str | None, name: str) -> storage.Location:
    """The folder of run ``name``."""
    return storage_root(storage_path, endpoint_url).child(name)


class RunFolderTaken(FileExistsError):
    """A new run's folder exists already (another run has that name)."""


def reserve(run: storage.Location, record: dict) -> None:
    """Claim the folder of a new run before anything is written there; raises :class:`RunFolderTaken` when the
    folder (or, on S3, anything under its prefix) exists. Local folders are claimed with ``mkdir`` and S3
    prefixes with a conditional put of the record (``If-None-Match: *``): of two jobs claiming one name at the
    same moment, exactly one wins."""
    body = json.dumps({**record, "reserved_at": time.time(), "host": socket.gethostname(), "pid": os.getpid()},
                      indent=1).encode()
    if not run.is_s3:
        os.makedirs(os.path.dirname(run.path), exist_ok=True)
        try:
            os.mkdir(run.path)
        except FileExistsError:
            raise RunFolderTaken(run.url) from None
        storage.write_bytes(run.child(RUN_RECORD), body)
        return
    if _listing(run, recursive=False):
        raise RunFolderTaken(run.url)
    from botocore.exceptions import ClientError

    bucket, _, key = run.child(RUN_RECORD).path.partition("/")
    try:
        storage.s3_client(run.endpoint_url).put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as error:  # 412: the record exists, 409: another job is writing it right now
        if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise RunFolderTaken(run.url) from None
        raise


def read_record(run: storage.Location) -> dict:
    """The run's reservation record (empty for runs older than records)."""
    try:
        return json.loads(storage.read_bytes(run.child(RUN_RECORD)))
    except (FileNotFoundError, ValueError):
        return {}


def update_record(run: storage.Location, **fields) -> None:
    """Add ``fields`` to the run's record (the MLflow run id once it exists, a ``--from-step`` pin)."""
    storage.write_bytes(run.child(RUN_RECORD), json.dumps({**read_record(run), **fields}, indent=1).encode())


def run_exists(run: storage.Location) -> bool:
    """Whether anything of the run is in storage (its record, Ray Train's snapshot or a checkpoint)."""
    return bool(_listing(run, recursive=False))


# --------------------------------------------------------------------------- manifests


def describe_files(directory: str) -> dict[str, dict]:
    """Every file under a local ``directory``: relative path -> size and SHA-256 (what a manifest lists)."""
    files = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    return files


def sha256_of(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_manifest(checkpoint: storage.Location, step: int, world_size: int, files: dict[str, dict]) -> None:
    """Write the manifest last: its presence is what marks the checkpoint complete."""
    manifest = {"format": 1, "step": step, "world_size": world_size, "written_at": time.time(), "files": files}
    storage.write_bytes(checkpoint.child(MANIFEST_FILE), json.dumps(manifest, indent=1).encode())


def read_manifest(checkpoint: storage.Location) -> dict | None:
    try:
        manifest = json.loads(storage.read_bytes(checkpoint.child(MANIFEST_FILE)))
    except (FileNotFoundError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def checksum_problems(directory: str, manifest: dict, names: list[str]) -> list[str]:
    """What is wrong with ``names`` (manifest paths) in a local copy of a checkpoint: missing, wrong size or
    wrong SHA-256, each as ``path: what``. Every rank checks its share of the files before loading."""
    problems = []
    for name in names:
        expected, path = manifest["files"][name], os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{name}: missing")
        elif os.path.getsize(path) != expected["size"]:
            problems.append(f"{name}: {_size(os.path.getsize(path))}, the manifest says {_size(expected['size'])}")
        elif sha256_of(path) != expected["sha256"]:
            problems.append(f"{name}: its SHA-256 differs from the manifest's (the file was changed or damaged)")
    return problems


def remove_checkpoint(checkpoint: storage.Location) -> None:
    """Delete an incomplete checkpoint folder (a save that never finished: no manifest, not in Ray's snapshot)."""
    checkpoint.fs.delete_dir(checkpoint.path)


def mark_damaged(checkpoint: storage.Location, problem: str) -> None:
    """Note beside a checkpoint that it failed verification, so no later start picks it again."""
    storage.write_bytes(checkpoint.child(DAMAGE_NOTE), json.dumps({"problem": problem, "at": time.time()}).encode())


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint folder of a run, as its listing and manifest describe it."""

    location: storage.Location
    name: str
    step: int
    written_at: float
    """When its manifest was written (0 for a checkpoint older than manifests)."""
    problem: str | None
    """None when complete; else what is wrong (no manifest, a file missing or of the wrong size, ...)."""
    incomplete: bool = False
    """No manifest: a save that never finished (nothing of the run was lost with it)."""
    verified: bool = True
    """False for a checkpoint older than manifests (complete by Ray Train's snapshot, not checked)."""
    marked: bool = False
    """Its damage was noted beside it already (``mark_damaged``): it has been reported before."""


def list_checkpoints(run: storage.Location) -> list[CheckpointInfo]:
    """Every checkpoint folder of the run, oldest first, checked against its manifest by sizes (one listing, no
    file read beyond the manifests)."""
    base = run.path.rstrip("/") + "/"
    folders: set[str] = set()
    sizes: dict[str, dict[str, int]] = {}
    for info in _listing(run, recursive=True):
        folder, _, rest = info.path[len(base):].partition("/")
        if _CHECKPOINT_DIR.fullmatch(folder):
            folders.add(folder)
            if rest and info.type == pafs.FileType.File:
                sizes.setdefault(folder, {})[rest] = info.size
    registered = _snapshot_names(run)
    checkpoints = [_describe(run.child(name), name, sizes.get(name, {}), name in registered) for name in folders]
    return sorted(checkpoints, key=lambda c: (c.step, c.written_at, c.name))


def checkpoint_info(checkpoint: storage.Location) -> CheckpointInfo:
    """One checkpoint folder checked against its manifest by sizes (``--model <checkpoint folder>``)."""
    name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    run = storage.Location(checkpoint.fs, checkpoint.path.rstrip("/").rsplit("/", 1)[0],
                           checkpoint.url.rstrip("/").rsplit("/", 1)[0], checkpoint.endpoint_url)
    base = checkpoint.path.rstrip("/") + "/"
    sizes = {info.path[len(base):]: info.size for info in _listing(checkpoint, recursive=True)
             if info.type == pafs.FileType.File}
    return _describe(checkpoint, name, sizes, name in _snapshot_names(run))


def resume_checkpoint(run: storage.Location) -> tuple[CheckpointInfo | None, list[CheckpointInfo]]:
    """The checkpoint a (re)started run continues from, and the newer ones passed over because they are damaged.

    The newest complete checkpoint by step; a ``--from-step`` pin in the run's record keeps checkpoints of later
    steps that were written before the pin out of the choice (they belong to the abandoned course).
    """
    pin = read_record(run).get("pinned")
    candidates = list_checkpoints(run)
    if pin:
        candidates = [c for c in candidates if c.step <= pin["step"] or c.written_at > pin["at"]]
    chosen = next((c for c in reversed(candidates) if c.problem is None), None)
    passed_over = [c for c in candidates if c.problem is not None and (chosen is None or c.step >= chosen.step)]
    return chosen, passed_over


def latest_checkpoint(run: storage.Location) -> storage.Location | None:
    """The folder of the run's newest complete checkpoint (None before the first)."""
    chosen, _ = resume_checkpoint(run)
    return chosen.location if chosen else None


def _describe(location: storage.Location, name: str, sizes: dict[str, int], registered: bool) -> CheckpointInfo:
    match = _CHECKPOINT_DIR.fullmatch(name)
    step = int(match.group(1)) if match else -1
    if DAMAGE_NOTE in sizes:
        note = json.loads(storage.read_bytes(location.child(DAMAGE_NOTE)))
        return CheckpointInfo(location, name, step, 0.0, note.get("problem", "marked damaged"), marked=True)
    if MANIFEST_FILE not in sizes:
        if registered and STATE_FILE in sizes:  # written before manifests existed
            return CheckpointInfo(location, name, step, 0.0, None, verified=False)
        return CheckpointInfo(location, name, step, 0.0, "no manifest: the save did not finish", incomplete=True)
    manifest = read_manifest(location)
    if manifest is None:
        return CheckpointInfo(location, name, step, 0.0, f"{MANIFEST_FILE} is unreadable")
    missing = sorted(set(manifest["files"]) - set(sizes))
    wrong = [(path, sizes[path], entry["size"]) for path, entry in sorted(manifest["files"].items())
             if path in sizes and sizes[path] != entry["size"]]
    problem = None
    if missing:
        problem = f"{len(missing)} file(s) missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    elif wrong:
        path, size, expected = wrong[0]
        problem = f"{path} is {_size(size)}, the manifest says {_size(expected)}"
    return CheckpointInfo(location, name, step, float(manifest.get("written_at", 0.0)), problem)


def _snapshot_names(run: storage.Location) -> set[str]:
    """Checkpoint folders Ray Train's snapshot lists (what its checkpoint manager knows of the run)."""
    try:
        snapshot = json.loads(storage.read_bytes(run.child(RUN_SNAPSHOT)))
    except (FileNotFoundError, ValueError):
        return set()
    results = snapshot.get("checkpoint_results", []) + [snapshot.get("latest_checkpoint_result") or {}]
    return {result["checkpoint_dir_name"] for result in results if result.get("checkpoint_dir_name")}


def _listing(folder: storage.Location, *, recursive: bool) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(folder.path, allow_not_found=True, recursive=recursive)
    return folder.fs.get_file_info(selector)


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count:,} bytes"
