"""The training worker's own code on one GPU, without Ray: the bf16 paths that only a GPU exercises.

    python benchmarks/gpu_train_path.py [--config configs/vit_l14.yaml] [--micro-batch 32] [--json out.jsonl]

``orchestrator.train.worker_loop`` runs inside Ray Train, whose wheel is too large for the GPU check machine;
``harness.train_path.run_checks`` drives the same functions directly on the run config given, in one process:
the engine's ``steps`` (the loss must fall), the in-loop ``eval`` under autocast, the OpenAI-layout ``export``,
and ``compile`` (``--compile-model``, a smaller model). Its docstring says what each check asserts.

Each check prints one JSON line (and appends it to ``--json``); the process exits non-zero on a failed
check. ``--device cpu`` with ``--set model.name=ViT-tiny`` runs the same checks on a CPU, for a dry run
(the suite runs ``run_checks`` that way: ``tests/integration/test_gpu_check_dry_run.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.train_path import failed_checks, run_checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/vit_l14.yaml")
    parser.add_argument("--set", action="append", default=[], help="section.field=value overrides")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--compile-model", default=None, help="also check model.compile on this architecture")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    records = run_checks(args.config, args.set, micro_batch=args.micro_batch, steps=args.steps,
                         compile_model=args.compile_model, device=args.device, json_path=args.json)
    failed = failed_checks(records)
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
