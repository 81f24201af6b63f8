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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from models import get_model_spec  # noqa: E402
from models.flops import forward_flops  # noqa: E402
from orchestrator.plan import plan, train_flops_per_sample  # noqa: E402
from orchestrator.plan.report import (  # noqa: E402
    config_error_types,
    format_plan,
    parse_plan_args,
    resolve,
    run_config_yaml,
    to_json,
)
from orchestrator.plan.timing import CAPTION_TOKENS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_plan_args(argv, __doc__)
        spec, chosen, base = resolve(args)
        text_spec = get_model_spec(spec.name, context_length=CAPTION_TOKENS)
        locked = frozenset(lock.tower for lock in chosen["locks"] if lock.unlocked_layers == 0)
        image_flops = forward_flops(spec, patch_dropout=chosen["patch_dropout"])[0]
        flops = train_flops_per_sample((image_flops, forward_flops(text_spec)[1]), locked)
        result = plan(spec, flops_per_sample=flops, **chosen)
        if args.write_config:
            run_config_yaml(result, base, args.write_config)
    except config_error_types() as error:  # a flag or config mistake: one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(to_json(result) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
