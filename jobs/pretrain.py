"""Pretrain CLIP on Ray Train + DeepSpeed, tracked in MLflow.

    python jobs/pretrain.py                                  # configs/local.yaml: CPU, 2 workers, minutes
    python jobs/pretrain.py --config configs/vit_l14.yaml --set optim.lr=3e-4
    python jobs/pretrain.py --resume rayclip-local-20260101-120000   # continue a stopped run
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/vit_l14.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from orchestrator.config import ConfigError, load_config, output_base_dir, resolve_local_paths  # noqa: E402
from orchestrator.logs import setup_logging  # noqa: E402
from orchestrator.train import build_trainer, check_inputs, describe_result, init_ray, name_run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="run config YAML (default: configs/local.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--resume", default=None, metavar="RUN_NAME", help="continue this run from its latest checkpoint")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = setup_logging()
    try:
        outputs = output_base_dir()
        if outputs != Path.cwd().resolve():
            log.info("relative checkpoint and MLflow paths resolve under %s (this directory is a temporary "
                     "copy; set RAYCLIP_HOME to choose)", outputs)
        config = load_config(args.config, args.overrides)
        cfg = name_run(resolve_local_paths(config, os.getcwd(), outputs), args.resume)
        check_inputs(cfg)
    except (ConfigError, OSError, ValueError) as error:  # a config or input mistake: one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        return 2
    import ray

    init_ray(cfg)
    try:
        result = build_trainer(cfg).fit()
        print(describe_result(cfg, result))
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
