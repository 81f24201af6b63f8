"""Pretrain CLIP on Ray Train + DeepSpeed, tracked in MLflow.

    python jobs/pretrain.py                                  # configs/local.yaml: CPU, 2 workers, minutes
    python jobs/pretrain.py --config configs/vit_l14.yaml --set optim.lr=3e-4
    python jobs/pretrain.py --resume rayclip-local-20260101-120000-3f9a   # continue a stopped run
    python jobs/pretrain.py --resume rayclip-local-20260101-120000-3f9a --from-step 400   # from an older checkpoint
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/vit_l14.yaml

Ctrl-C saves a checkpoint at the next step and stops (Ctrl-C again stops at once); the job prints how to resume.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jobs.cli import fail, parse_pretrain_args
from orchestrator import noise
from orchestrator.config import ConfigError, load_config, output_base_dir, resolve_local_paths
from orchestrator.logs import setup_logging
from orchestrator.train import conclude, prepare_run, start_and_fit


def main(argv: list[str] | None = None) -> int:
    args = parse_pretrain_args(argv, __doc__)
    log = setup_logging()
    noise.install(noise.DRIVER)
    try:
        outputs = output_base_dir()
        if outputs != Path.cwd().resolve():
            log.info("relative checkpoint and MLflow paths resolve under %s (this directory is a temporary "
                     "copy; set RAYCLIP_HOME to choose)", outputs)
        config = load_config(args.config, args.overrides)
        cfg = prepare_run(resolve_local_paths(config, os.getcwd(), outputs), args.resume, args.from_step)
    except (ConfigError, OSError, ValueError) as error:  # a config or input mistake: one line, exit 2
        return fail(error)
    import ray

    try:
        outcome = start_and_fit(cfg)
    finally:
        ray.shutdown()
    lines, code = conclude(cfg, outcome)
    print("\n".join(lines), file=sys.stderr if code == 1 and outcome.result is None else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
