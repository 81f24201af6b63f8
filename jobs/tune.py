"""Search pretraining hyperparameters with Ray Tune: every trial a real pretraining run, compared in MLflow.

    python jobs/tune.py                                            # configs/tune_local.yaml: minutes on a laptop
    python jobs/tune.py --config configs/tune_vit_b32.yaml         # a proxy search on a GPU cluster
    python jobs/tune.py --resume rayclip-tune-20261202-101500      # continue a search whose driver died

The config is a run config plus a ``tune`` section (search space by dotted path, metric, ASHA, Optuna);
the best trial's config is written as YAML that ``jobs/pretrain.py --config`` runs.
"""

from __future__ import annotations

import os
import sys

from jobs.cli import fail, parse_tune_args
from orchestrator import noise
from orchestrator.config import ConfigError, load_config, output_base_dir, resolve_local_paths
from orchestrator.logs import setup_logging
from orchestrator.train import check_inputs, init_ray
from orchestrator.tune import format_table, name_search, run_search, summarize


def main(argv: list[str] | None = None) -> int:
    args = parse_tune_args(argv, __doc__)
    setup_logging()
    noise.install(noise.DRIVER)
    try:
        outputs = output_base_dir()
        cfg = resolve_local_paths(load_config(args.config, args.overrides), os.getcwd(), outputs)
        if cfg.tune is None:
            raise ConfigError(f"{args.config}: no 'tune' section (search space, metric); see configs/tune_local.yaml")
        search = name_search(cfg, args.resume)
        check_inputs(search.cfg)
    except (ConfigError, OSError, ValueError) as error:  # a config or input mistake: one line, exit 2
        return fail(error)
    import ray

    init_ray(search.cfg, runs_at_once=search.cfg.tune.max_concurrent_trials)
    try:
        summary = summarize(run_search(search), search, os.path.join(outputs, "outputs", "tune", search.name))
    finally:
        ray.shutdown()
    section = search.cfg.tune
    print(format_table(summary, section.metric, section.time_attr))
    print(f"search: {search.name} (resume with: python jobs/tune.py --resume {search.name}); state in {search.folder.url}")
    print(f"MLflow: search run {search.parent_run_id} in experiment {search.cfg.tracking.experiment!r} at {search.cfg.tracking.uri}")
    if summary.best is None:
        print("no trial reported the metric: no best config")
        return 1
    print(f"best config ({section.metric} {summary.best.metric:.4f}, trial {summary.best.name}): {summary.best_config_path}")
    print(summary.best_config_yaml)
    return 0


if __name__ == "__main__":
    sys.exit(main())
