"""Evaluation end to end: sets in every layout built from real Debian data (CLIP_benchmark's layout by the real
``clip-benchmark`` writer), a model pretrained here with those sets evaluated in the loop, and ``jobs/evaluate.py``
run as a user runs it, on the run and on its exported file.

What must hold: the same 500 Fashion-MNIST test images give the same zero-shot top-1 in the rayclip,
CLIP_benchmark and image-folder layouts, in the training loop and from the job; the job's retrieval recall on
Tux Paint stamps with three captions each equals a plain reference computed here image by image; the linear
probe beats zero-shot by a wide margin (as in the paper); results land in MLflow (the training run, or a new
run tagged with the model's source) with their plots; bad input is one line naming the file, exit code 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from jobs.cli import parse_evaluate_args
from models import load_openai_checkpoint
from orchestrator.config import load_config, resolve_local_paths
from orchestrator.data import FASHION_MNIST_HELDOUT_TEMPLATE
from orchestrator.eval import FeatureEncoder, prepare, run_evaluation
from orchestrator.train import build_trainer, name_run
from tests.clip_benchmark_sets import stamp_captions, write_classification_set, write_image_folder, write_retrieval_set
from tests.factories import artifact_paths

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_IMAGES = 500
STAMPS = 60
TEMPLATE = FASHION_MNIST_HELDOUT_TEMPLATE  # "a photo of a {}.": the held-out split's own template


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-sets")
    return {
        "wds": write_classification_set(root / "fashion-wds", {"train": 1500, "test": TEST_IMAGES},
                                        templates=(TEMPLATE.replace("{}", "{c}"),), max_count=200),
        "folder": write_image_folder(root / "fashion-folder", "test", TEST_IMAGES),
        "stamps": write_retrieval_set(root / "stamps-wds", STAMPS, max_count=25),
    }


@pytest.fixture(scope="module")
def trained(fashion_mnist_shards, sets, tmp_path_factory):
    """A ViT-tiny pretrained for 60 steps, evaluating every set at its end inside the training loop."""
    work = tmp_path_factory.mktemp("eval-run")
    eval_sets = (f"[{{name: wds, data: {sets['wds']}}}, "
                 f"{{name: folder, data: {sets['folder'] / 'test'}, templates: ['{TEMPLATE}']}}, "
                 f"{{name: probe, data: {sets['wds']}, task: linear-probe}}, "
                 f"{{name: stamps, data: {sets['stamps']}, task: retrieval}}]")
    overrides = [f"data.shards={fashion_mnist_shards}", "data.decode_concurrency=1", "data.shuffle_buffer=256",
                 "deepspeed.micro_batch_size=64", "schedule.warmup_steps=5", "schedule.total_steps=60",
                 "optim.lr=2e-3", "checkpoint.every_steps=60", f"checkpoint.storage_path={work / 'runs'}",
                 f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.log_every_steps=20",
                 f"eval.max_images={TEST_IMAGES}", f"eval.sets={eval_sets}"]
    cfg = name_run(resolve_local_paths(load_config(None, overrides), work))
    result = build_trainer(cfg).fit()
    assert result.metrics["step"] == 60
    return cfg, result, work


def evaluate_in_session(*args: str) -> list:
    """``jobs/evaluate.py``'s steps in this process, on the session's Ray (no Ray start per call)."""
    options, namespace = parse_evaluate_args(list(args), "")
    cfg = load_config(None, namespace.overrides)
    return run_evaluation(options, cfg, *prepare(options, cfg))


def evaluate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``jobs/evaluate.py`` as a user runs it (its own Ray)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "evaluate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_every_layout_scores_the_same_in_the_loop_and_from_the_job(trained, sets, fashion_mnist_shards):
    cfg, result, work = trained
    in_loop = {name: result.metrics[f"eval/{name}/zeroshot_top1"] for name in ("heldout", "wds", "folder")}
    assert in_loop["heldout"] == result.metrics["zero_shot_top1"] > 0.3, in_loop  # trained, far above chance
    # same images, same template, other layout (the ranks' batches differ: a float tie may flip one image)
    assert max(in_loop.values()) - min(in_loop.values()) <= 1 / TEST_IMAGES, in_loop

    run = evaluate("--model", cfg.name, "--data", f"heldout={fashion_mnist_shards}", "--data", f"wds={sets['wds']}",
                   "--data", f"folder={sets['folder']}", "--templates", TEMPLATE,
                   "--max-images", str(TEST_IMAGES), "--output", str(work / "zeroshot.json"),
                   "--set", f"checkpoint.storage_path={cfg.checkpoint.storage_path}",
                   "--set", f"tracking.uri={cfg.tracking.uri}", cwd=work)
    assert run.returncode == 0, run.stderr[-3000:]
    job = {r["set"]: r for r in json.loads((work / "zeroshot.json").read_text())["results"]}
    for name, value in in_loop.items():
        assert job[name]["images"] == TEST_IMAGES
        assert job[name]["metrics"]["zeroshot_top1"] == pytest.approx(value, abs=1 / TEST_IMAGES), name
        assert f"{name} zero-shot top-1: {job[name]['metrics']['zeroshot_top1']:.3f}" in run.stdout
    assert run.stdout.strip().splitlines()[-1].startswith("folder zero-shot top-1: ")

    client = MlflowClient(cfg.tracking.uri)  # logged into the training run, at its last step
    run_id = result.metrics["mlflow_run_id"]
    history = client.get_metric_history(run_id, "eval/wds/zeroshot_top1")
    assert [m.step for m in history] == [60, 60]
    artifacts = artifact_paths(client, run_id)
    assert {"eval/wds/confusion_step_00000060.png", "eval/wds/per_class_step_00000060.png",
            "eval/stamps/recall_at_k_step_00000060.png", "eval/wds/curve.png"} <= artifacts
    assert any(path.startswith("eval/") and path.endswith(".json") for path in artifacts)


def test_linear_probe_beats_zero_shot_in_the_loop_and_from_the_job(trained, sets, capsys):
    cfg, result, work = trained
    zero_shot, probe = result.metrics["eval/wds/zeroshot_top1"], result.metrics["eval/probe/linear_probe_top1"]
    assert probe > zero_shot + 0.1, (probe, zero_shot)
    export = Path(result.checkpoint.path) / "openai_model.pt"
    [job] = evaluate_in_session("--model", str(export), "--task", "linear-probe", "--data", f"probe={sets['wds']}",
                                "--output", str(work / "probe.json"), "--set", f"tracking.uri={cfg.tracking.uri}")
    assert job.details["train_samples"] + job.details["validation_samples"] == 1500
    assert job.metrics["linear_probe_top1"] == pytest.approx(probe, abs=0.01)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"probe linear-probe top-1: {job.metrics['linear_probe_top1']:.3f}"
    assert json.loads((work / "probe.json").read_text())["results"][0]["metrics"] == job.metrics

    client = MlflowClient(cfg.tracking.uri)  # a file has no training run: a new run, tagged with its source
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              "tags.`rayclip.kind` = 'evaluation'")
    assert len(runs) == 1 and runs[0].data.tags["rayclip.model_source"] == str(export)
    assert runs[0].data.metrics["eval/probe/linear_probe_top1"] == job.metrics["linear_probe_top1"]
    assert "eval/probe/per_class_step_00000000.png" in artifact_paths(client, runs[0].info.run_id)


def reference_recall(model, stamps: list[tuple[Path, list[str]]], k: int) -> tuple[float, float]:
    """Recall@k computed plainly, image by image and caption by caption, from the model in this process: an
    image is found when one of its captions has fewer than k captions scoring above it, a caption when its
    image has fewer than k images above it (ties count for the match; some stamps share a caption)."""
    encoder = FeatureEncoder(model.eval())
    images = encoder.image_features(encoder.pixels([path.read_bytes() for path, _ in stamps]).images)
    owners = [index for index, (_, captions) in enumerate(stamps) for _ in captions]
    texts = encoder.text_features([caption for _, captions in stamps for caption in captions])
    scores = (F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T).tolist()  # [image][caption]
    image_hits = 0
    for i, row in enumerate(scores):
        best_own = max(score for j, score in enumerate(row) if owners[j] == i)
        image_hits += sum(score > best_own for score in row) < k
    text_hits = 0
    for j, owner in enumerate(owners):
        column = [row[j] for row in scores]
        text_hits += sum(score > column[owner] for score in column) < k
    return image_hits / len(stamps), text_hits / len(owners)


def test_retrieval_with_several_captions_matches_a_plain_reference(trained, sets):
    cfg, result, work = trained
    export = Path(result.checkpoint.path) / "openai_model.pt"
    [job] = evaluate_in_session("--model", str(export), "--task", "retrieval", "--data", f"stamps={sets['stamps']}",
                                "--no-mlflow", "--output", str(work / "retrieval.json"))
    stamps = stamp_captions(STAMPS)
    assert job.images == STAMPS and job.details["captions"] == sum(len(c) for _, c in stamps) > 2 * STAMPS
    model = load_openai_checkpoint(torch.load(export, weights_only=True))
    for k in (1, 5, 10):
        image_to_text, text_to_image = reference_recall(model, stamps, k)
        assert job.metrics[f"image_to_text_recall_at_{k}"] == pytest.approx(image_to_text, abs=1e-6)
        assert job.metrics[f"text_to_image_recall_at_{k}"] == pytest.approx(text_to_image, abs=1e-6)
    assert result.metrics["eval/stamps/image_to_text_recall_at_5"] == pytest.approx(
        job.metrics["image_to_text_recall_at_5"], abs=1 / STAMPS)


def test_bad_input_is_one_line_naming_the_file(trained, sets, tmp_path):
    cfg, result, work = trained
    export = str(Path(result.checkpoint.path) / "openai_model.pt")
    no_names = tmp_path / "no-names"
    (no_names / "test").mkdir(parents=True)
    for name in ("nshards.txt", "0.tar"):
        (no_names / "test" / name).write_bytes((sets["wds"] / "test" / name).read_bytes())
    run = evaluate("--model", export, "--data", str(no_names), "--no-mlflow", cwd=tmp_path)
    assert run.returncode == 2 and f"{no_names}/classnames.txt" in run.stderr and "Traceback" not in run.stderr

    run = evaluate("--model", export, "--data", str(sets["folder"]), "--split", "val", "--no-mlflow", cwd=tmp_path)
    assert run.returncode == 2 and f"{sets['folder']}/val: no class folders" in run.stderr

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    run = evaluate("--model", str(text), "--data", str(sets["wds"]), "--no-mlflow", cwd=tmp_path)
    assert run.returncode == 2 and str(text) in run.stderr and "neither" in run.stderr and "Traceback" not in run.stderr

    out_of_range = tmp_path / "out-of-range"
    (out_of_range / "test").mkdir(parents=True)
    (out_of_range / "classnames.txt").write_text("cat\ndog\n")  # 2 names; Fashion-MNIST's indices run to 9
    (out_of_range / "test" / "nshards.txt").write_text("1\n")
    (out_of_range / "test" / "0.tar").write_bytes((sets["wds"] / "test" / "0.tar").read_bytes())
    with tarfile.open(out_of_range / "test" / "0.tar") as archive:
        first_bad = next(m.name for m in archive if m.name.endswith(".cls") and int(archive.extractfile(m).read()) > 1)
    run = evaluate("--model", export, "--data", str(out_of_range), "--no-mlflow", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert f"{out_of_range}/test/0.tar: sample {first_bad.removesuffix('.cls')!r}" in run.stderr
    assert "outside the 2 class names" in run.stderr
