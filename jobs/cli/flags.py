"""Every job's flags, turned into typed values for the library: the parsers behind ``jobs/*.py``.

Each parser imports the library packages it needs itself, so that a job (and its ``--help``) loads only its own.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.cli.arguments import add_overrides, config_file_argument, count_argument, endpoint_url_argument, job_parser

if TYPE_CHECKING:
    from orchestrator.eval import EvaluationOptions
    from orchestrator.plan import PlanRequest

TUNE_LOCAL_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tune_local.yaml")


def parse_pretrain_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """``jobs/pretrain.py``: ``config``, ``overrides``, ``resume``, ``from_step``."""
    parser = job_parser(description)
    parser.add_argument("--config", default=None, help="run config YAML (default: configs/local.yaml)")
    add_overrides(parser)
    parser.add_argument("--resume", default=None, metavar="RUN_NAME",
                        help="continue this run from its newest intact checkpoint")
    parser.add_argument("--from-step", type=int, default=None, metavar="N",
                        help="with --resume: continue from the checkpoint of step N instead")
    return parser.parse_args(argv)


def parse_tune_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """``jobs/tune.py``: ``config``, ``overrides``, ``resume``."""
    parser = job_parser(description)
    parser.add_argument("--config", default=TUNE_LOCAL_CONFIG, help="tune config YAML (default: configs/tune_local.yaml)")
    add_overrides(parser)
    parser.add_argument("--resume", metavar="SEARCH_NAME", help="continue this search (its saved config is used)")
    return parser.parse_args(argv)


def parse_demo_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """``jobs/demo.py``: ``overrides``."""
    parser = job_parser(description)
    add_overrides(parser)
    return parser.parse_args(argv)


def parse_no_args(argv: list[str] | None, description: str | None) -> None:
    """A job without flags (``jobs/model_zoo.py``): ``--help``, or argparse's refusal of anything else."""
    job_parser(description).parse_args(argv)


def parse_evaluate_args(argv: list[str] | None, description: str | None) -> tuple[EvaluationOptions, argparse.Namespace]:
    """``jobs/evaluate.py``: the options, and the namespace with ``config`` / ``overrides``."""
    from orchestrator.config import EVAL_LAYOUTS, EVAL_TASKS
    from orchestrator.eval import EvaluationOptions

    parser = job_parser(description)
    parser.add_argument("--model", required=True, help="run name, run/checkpoint folder, or OpenAI-layout .pt file")
    parser.add_argument("--task", default="zeroshot", choices=EVAL_TASKS)
    parser.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH", help="an evaluation set (repeatable)")
    parser.add_argument("--templates", help="a file of prompt templates (one per line) or one template, e.g. 'a photo of a {}.'")
    parser.add_argument("--classnames", help="a file of class names, one per line in class-index order")
    parser.add_argument("--layout", default="auto", choices=EVAL_LAYOUTS)
    parser.add_argument("--split", default="test", help="the split evaluated (default: test)")
    parser.add_argument("--train-split", default="train", help="linear-probe: the split the probe is fit on")
    parser.add_argument("--max-images", type=count_argument, help="only the first N images of each set (quick checks)")
    parser.add_argument("--max-train-images", type=count_argument, help="linear-probe: only the first N training images")
    parser.add_argument("--batch-size", type=count_argument, default=256, help="images per forward pass (default: 256)")
    parser.add_argument("--encoders", type=count_argument, help="model actors (default: one per GPU, else by CPU count)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on GPUs")
    parser.add_argument("--output", help="results JSON (default: outputs/eval/<model>-<time>.json)")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="do not log to MLflow")
    parser.add_argument("--config", type=config_file_argument,
                        help="run config naming checkpoint.storage_path and tracking.uri (default: configs/local.yaml)")
    add_overrides(parser)
    args = parser.parse_args(argv)
    return EvaluationOptions(**{k: v for k, v in vars(args).items() if k not in ("config", "overrides")}), args


def parse_prepare_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """``jobs/prepare_data.py``; a count below 1 or an endpoint that is no URL is argparse's usage error."""
    from orchestrator.data import IMAGE_FORMATS

    parser = job_parser(description)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="captioned folder, table (.csv/.jsonl/.parquet) or 'fashion-mnist'")
    what.add_argument("--index", nargs="+", metavar="SHARDS", help="shards to count: folders, prefixes, brace patterns")
    parser.add_argument("--output", help="folder or s3://bucket/prefix (bucket must exist); --index: manifest place")
    parser.add_argument("--shard-size", type=count_argument, default=10_000, help="samples per shard")
    parser.add_argument("--max-side", type=count_argument, default=256, help="cap on the longest side (aspect kept)")
    parser.add_argument("--image-format", default="jpg", choices=list(IMAGE_FORMATS))
    parser.add_argument("--workers", type=count_argument, default=os.cpu_count() or 2, help="shard tasks in flight")
    parser.add_argument("--s3-endpoint-url", type=endpoint_url_argument, help="MinIO/moto endpoint; keys come from the AWS chain")
    parser.add_argument("--image-column", default="image", help="table column with the image path or s3:// URL")
    parser.add_argument("--caption-column", default="caption", help="table column with the caption")
    parser.add_argument("--caption-key", default=None, help="--index: caption from this KEY.json field (data.caption_key)")
    parser.add_argument("--limit", type=count_argument, default=None, help="only the first N inputs (fashion-mnist: per split)")
    args = parser.parse_args(argv)
    if args.input and not args.output:
        parser.error("--input needs --output")
    return args


class _PlanParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line naming the flag instead of argparse's usage + exit
        from orchestrator.plan import PlanArgumentError

        raise PlanArgumentError(message)


def parse_plan_args(argv: list[str] | None, description: str | None) -> tuple[PlanRequest, bool]:
    """``jobs/plan.py``: the request and whether ``--json`` was given; ``PlanArgumentError`` for a bad flag."""
    from models import list_models
    from orchestrator.plan import GPU_TYPES, PAPER_SAMPLES, UPLOAD_GBPS, PlanRequest

    parser = job_parser(description, _PlanParser)
    parser.add_argument("--model", help=f"architecture; allowed: {', '.join(list_models())} (default: --config's)")
    parser.add_argument("--gpus", type=int, help="GPUs (= Ray Train workers; default: --config's scaling.num_workers)")
    parser.add_argument("--gpu-type", default="h100", help=f"allowed: {', '.join(GPU_TYPES)}")
    parser.add_argument("--global-batch", type=int, help="samples per optimizer step (default: --config's, else 32768)")
    parser.add_argument("--config", type=config_file_argument, help="a run config YAML to start from")
    parser.add_argument("--micro-batch", type=int, help="pin the per-GPU micro-batch (default: the largest that fits)")
    parser.add_argument("--zero-stage", type=int, help="0-3 (default: --config's, else 1)")
    parser.add_argument("--precision", help="autocast (rayclip's bf16: autocast over fp32 weights), bf16 "
                        "(bf16 weights + fp32 master, as benchmarks/gpu_step.py --precision bf16), fp32")
    parser.add_argument("--grad-checkpointing", help="on|off (default: --config's, else on)")
    parser.add_argument("--lock", action="append", default=[], metavar="TOWER", help="image|text: plan with that "
                        "tower locked whole (LiT; repeatable; default: --config's model.lock_image/lock_text)")
    parser.add_argument("--patch-dropout", type=float, help="FLIP's share of patch tokens dropped, ViTs only "
                        "(default: --config's model.patch_dropout, else 0)")
    parser.add_argument("--samples", type=float, default=PAPER_SAMPLES, help="samples to train (default 12.8e9)")
    parser.add_argument("--mfu", type=float, help="model FLOP utilisation (default: measured, benchmarks/results)")
    parser.add_argument("--compile", action="store_true", help="take the MFU measured with torch.compile")
    parser.add_argument("--upload-gbps", type=float, default=UPLOAD_GBPS, help="each worker's upload rate to the "
                        f"checkpoint storage, GB/s, for the checkpoint's cost (default {UPLOAD_GBPS})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--write-config", metavar="OUT.yaml", help="write the matching run config")
    flags = vars(parser.parse_args(argv))
    as_json = flags.pop("json")
    return PlanRequest(**{**flags, "lock": tuple(flags["lock"])}), as_json
