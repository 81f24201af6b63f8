"""Plan a pretraining run before launching it: per-GPU memory, micro-batch, step time, days and GPU-hours.

    python jobs/plan.py --model ViT-L/14 --gpus 256 --gpu-type h100 --global-batch 32768
    python jobs/plan.py --config configs/rn50x64.yaml --gpu-type a100-80gb --json
    python jobs/plan.py --model ViT-L/14 --gpus 512 --write-config vit_l14_512.yaml
    python jobs/plan.py --config configs/lit_vit_b32.yaml --gpus 64     # LiT: the locked image tower trains nothing
    python jobs/plan.py --model ViT-L/14 --gpus 256 --patch-dropout 0.5  # FLIP: half the patch tokens

Every figure comes from ``orchestrator.plan``; the GPU and instance figures from its GPU table, the MFU
from ``benchmarks/results/gpu_step_h100.jsonl`` unless --mfu is given.
"""

from __future__ import annotations

import sys

from jobs.cli import fail, parse_plan_args
from orchestrator.plan import config_error_types, format_plan, plan_request, run_config_yaml, to_json


def main(argv: list[str] | None = None) -> int:
    try:
        request, as_json = parse_plan_args(argv, __doc__)
        result, base = plan_request(request)
        if request.write_config:
            run_config_yaml(result, base, request.write_config)
    except config_error_types() as error:  # a flag or config mistake: one line, exit 2
        return fail(error)
    print(to_json(result) if as_json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
