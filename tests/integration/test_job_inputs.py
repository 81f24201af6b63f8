"""Bad input to every job, run as a user runs it: one ``error: ...`` line on stderr naming the argument or file
and what is allowed, exit code 2, no traceback, found before Ray starts (so each case costs an interpreter start).

The cases a user meets first run as subprocesses, as many at a time as there are cores (each is mostly Python's
imports); their variants run in this process through the jobs' ``main``. A model file is never answered with
PyTorch's advice to load it with ``weights_only=False``: a file from anywhere could then run code. argparse's own
refusals (a count below 1, an endpoint that is no URL) keep argparse's form: usage, then
``<job>: error: argument --flag: ...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from jobs.evaluate import main as evaluate_main
from jobs.plan import main as plan_main
from jobs.prepare_data import main as prepare_main

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
COUNT = "is not allowed; allowed: a whole number >= 1"
NOT_A_MODEL = "neither an OpenAI-layout state dict nor a TorchScript archive"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Wrong things to point the jobs at, and one small evaluation set so that ``--model`` is what fails."""
    root = tmp_path_factory.mktemp("job-inputs")
    paths = {name: root / name for name in ("empty", "not-a-run", "set", "captioned", "out")}
    for name in ("empty", "not-a-run", "captioned"):
        paths[name].mkdir()
    (paths["not-a-run"] / "notes.txt").write_text("hello\n")
    for label in ("cat", "dog"):
        (paths["set"] / "test" / label).mkdir(parents=True)
        Image.new("RGB", (8, 8), (40, 80, 120)).save(paths["set"] / "test" / label / "0.png")
    (paths["set"] / "classnames.txt").write_text("cat\ndog\n")
    Image.new("RGB", (8, 8)).save(paths["captioned"] / "square.png")
    (paths["captioned"] / "square.txt").write_text("a black square\n")
    paths["random"] = root / "random.pt"
    paths["random"].write_bytes(os.urandom(10))
    torch.save({"weight": torch.zeros(64, 64)}, root / "whole.pt")
    whole = (root / "whole.pt").read_bytes()
    paths["truncated"] = root / "truncated.pt"
    paths["truncated"].write_bytes(whole[: len(whole) // 2])
    paths["module"] = root / "module.pt"
    torch.save(torch.nn.Linear(2, 2), paths["module"])
    paths["table"] = root / "captions.csv"
    paths["table"].write_text("path,text\nsquare.png,a square\n")
    paths["file"] = root / "notes.txt"
    paths["file"].write_text("not a folder\n")
    return paths


# Case -> (the job and its arguments, what its error line must contain); {name} is a path from ``inputs``.
SUBPROCESS_CASES = {
    "prepare: missing input": (["jobs/prepare_data.py", "--input", "/nonexistent", "--output", "{out}"],
                               ["error: --input /nonexistent: no such file or folder; allowed: a captioned folder"]),
    "prepare: --limit 0": (["jobs/prepare_data.py", "--input", "fashion-mnist", "--output", "{out}", "--limit", "0"],
                           [f"error: argument --limit: '0' {COUNT}"]),
    "evaluate: random bytes": (["jobs/evaluate.py", "--model", "{random}", "--data", "{set}", "--no-mlflow"],
                               [f"error: --model {{random}}: {NOT_A_MODEL}"]),
    "evaluate: a model cut in half": (["jobs/evaluate.py", "--model", "{truncated}", "--data", "{set}", "--no-mlflow"],
                                      ["error: --model {truncated}: damaged or truncated"]),
    "plan: --write-config in a missing folder": (["jobs/plan.py", "--model", "ViT-B/32", "--gpus", "8",
                                                  "--write-config", "/nonexistent/run.yaml"],
                                                 ["error: --write-config /nonexistent/run.yaml: cannot be written"]),
    "model_zoo: an argument it does not take": (["jobs/model_zoo.py", "--limit", "3"],
                                                ["error: unrecognized arguments: --limit 3"]),
}


@pytest.fixture(scope="module")
def runs(inputs) -> dict[str, tuple[subprocess.CompletedProcess, list[str]]]:
    """Every subprocess case run (as many at a time as there are cores), with its expected texts filled in."""
    names = {name: str(path) for name, path in inputs.items()}

    def run(case: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        args, expected = SUBPROCESS_CASES[case]
        process = subprocess.run([sys.executable, *_fill(args, names)], cwd=REPO_ROOT, capture_output=True, text=True,
                                 timeout=120)
        return process, _fill(expected, names)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(SUBPROCESS_CASES, pool.map(run, SUBPROCESS_CASES)))


def _fill(texts: list[str], names: dict[str, str]) -> list[str]:
    filled = []
    for text in texts:
        for name, value in names.items():
            text = text.replace("{" + name + "}", value)
        filled.append(text)
    return filled


@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_a_bad_input_is_one_error_line_and_exit_code_2(case, runs):
    process, expected = runs[case]
    assert_refused(process.returncode, process.stderr, expected)


def assert_refused(code: int, stderr: str, expected: list[str]) -> None:
    errors = [line for line in stderr.splitlines() if "error: " in line]
    assert code == 2 and len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "weights_only" not in stderr, stderr[-3000:]
    if errors[0].startswith("error: "):  # ours: the only line on stderr
        assert stderr.strip() == errors[0], stderr[-3000:]
    else:  # argparse's: usage, then one error line
        assert stderr.startswith("usage: ") and errors[0].split(": ", 1)[1].startswith("error: "), stderr[-3000:]
        errors[0] = errors[0].split(": ", 1)[1]
    for text in expected:
        assert text in errors[0], errors[0]


def refused_in_process(main, args: list[str], capsys, expected: list[str]) -> None:
    """The job's ``main`` in this process (no interpreter start): the same checks as a subprocess."""
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    assert_refused(code, capsys.readouterr().err, expected)


def test_prepare_data_names_the_flag_for_each_unusable_input_or_output(inputs, s3_endpoint, capsys):
    out = str(inputs["out"])
    cases = [
        (["--input", str(inputs["captioned"]), "--output", "s3://no-such-bucket/shards", "--s3-endpoint-url", s3_endpoint],
         ["error: --output s3://no-such-bucket/shards: S3 bucket 'no-such-bucket' does not exist"]),
        (["--index", "/nonexistent/shards"], ["error: --index: folder /nonexistent/shards does not exist"]),
        (["--input", str(inputs["empty"]), "--output", out], [f"error: --input {inputs['empty']}: nothing to write"]),
        (["--input", str(inputs["file"]), "--output", out], [f"error: --input {inputs['file']}: a file that is no "
                                                              "table; allowed: a captioned folder, a table (.csv"]),
        (["--input", str(inputs["table"]), "--output", out], [f"error: --input {inputs['table']}: image_column='image' "
                                                               "is not a column", "columns: ['path', 'text']"]),
        (["--input", str(inputs["captioned"]), "--output", str(inputs["file"])], [f"error: --output {inputs['file']}:"]),
        (["--input", str(inputs["captioned"]), "--output", out, "--shard-size", "0"],
         [f"error: argument --shard-size: '0' {COUNT}"]),
        (["--input", str(inputs["captioned"]), "--output", out, "--max-side", "-1"],
         [f"error: argument --max-side: '-1' {COUNT}"]),
        (["--index", str(inputs["empty"]), "--workers", "0"], [f"error: argument --workers: '0' {COUNT}"]),
        (["--input", str(inputs["captioned"]), "--output", "s3://bucket/shards", "--s3-endpoint-url", "localhost:9000"],
         ["error: argument --s3-endpoint-url: 'localhost:9000' is not allowed; allowed: http(s)://host[:port]"]),
        (["--index", str(inputs["empty"])], [f"error: --index: {inputs['empty']} holds no files"]),
    ]
    for args, expected in cases:
        refused_in_process(prepare_main, args, capsys, expected)
    assert not any(inputs["out"].glob("*")), "nothing is written for a refused input"


def test_evaluate_names_the_model_file_and_never_suggests_unsafe_loading(inputs, tmp_path, capsys):
    empty, text = tmp_path / "empty.pt", tmp_path / "notes.pt"
    empty.touch()
    text.write_text("weights: none\n")
    data = ["--data", str(inputs["set"]), "--no-mlflow"]
    cases = [
        (["--model", str(inputs["not-a-run"]), *data],
         [f"error: --model {inputs['not-a-run']}: a folder that is neither a rayclip checkpoint"]),
        (["--model", str(inputs["module"]), *data], [f"error: --model {inputs['module']}: {NOT_A_MODEL}",
                                                     "torch.nn.modules.linear.Linear"]),
        (["--model", str(empty), *data], [f"error: --model {empty}: the file is empty"]),
        (["--model", str(text), *data], [f"error: --model {text}: {NOT_A_MODEL}"]),
        (["--model", str(inputs["random"]), *data, "--output", str(inputs["empty"])],
         [f"error: --output {inputs['empty']}: a folder"]),
        (["--model", str(inputs["random"]), *data, "--config", str(inputs["random"])],
         [f"error: argument --config: '{inputs['random']}' cannot be read (not UTF-8 text)"]),
        (["--model", str(inputs["random"]), *data, "--batch-size", "0"], [f"error: argument --batch-size: '0' {COUNT}"]),
        (["--model", str(inputs["random"]), *data, "--encoders", "0"], [f"error: argument --encoders: '0' {COUNT}"]),
        (["--model", str(inputs["random"]), *data, "--max-images", "-5"],
         [f"error: argument --max-images: '-5' {COUNT}"]),
    ]
    for args, expected in cases:
        refused_in_process(evaluate_main, args, capsys, expected)


def test_plan_refuses_numbers_and_files_it_cannot_use(inputs, capsys):
    cases = [
        (["--config", str(inputs["empty"])], [f"error: argument --config: '{inputs['empty']}' cannot be read (Is a "
                                               "directory); allowed: a run config YAML file"]),
        (["--model", "ViT-B/32", "--gpus", "8", "--samples", "inf"], ["error: --samples inf: allowed: a finite positive"]),
        (["--model", "ViT-B/32", "--gpus", "8", "--global-batch", "4"],
         ["error: --global-batch 4: fewer samples than the 8 GPUs; allowed: a count >= 8"]),
        (["--model", "ViT-B/32", "--gpus", "0"], ["error: --gpus 0: allowed: a count >= 1"]),
    ]
    for args, expected in cases:
        refused_in_process(plan_main, args, capsys, expected)


def test_plan_writes_a_config_without_a_base_config(tmp_path, capsys):
    """The bare defaults warm up for 2,000 steps of 1,000: the written schedule spans the planned samples."""
    from orchestrator.config import load_config

    out = tmp_path / "run.yaml"
    assert plan_main(["--model", "ViT-B/32", "--gpus", "8", "--samples", "3.2768e8", "--write-config", str(out)]) == 0
    cfg = load_config(str(out))
    assert (cfg.schedule.total_steps, cfg.schedule.warmup_steps, cfg.scaling.num_workers) == (10_000, 2000, 8)
