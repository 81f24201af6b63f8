"""The README demo: Fashion-MNIST shards -> CLIP pretraining with the default config -> zero-shot accuracy.

    python jobs/demo.py            # about 7 minutes on a 2-core laptop, CPU only

Training captions use several templates ("a picture of a {}.", ...); the zero-shot classifier uses the
held-out "a photo of a {}." on the 10,000 test images, which training never sees. The run's exported model
is then evaluated as a user would, with ``jobs/evaluate.py``; the last line is ``zero-shot top-1: 0.NNN``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from jobs import evaluate, prepare_data
from jobs.cli import fail, parse_demo_args
from orchestrator import noise
from orchestrator.config import ConfigError, load_config, resolve_local_paths
from orchestrator.logs import setup_logging
from orchestrator.train import conclude, prepare_run, start_and_fit


def main(argv: list[str] | None = None) -> int:
    args = parse_demo_args(argv, __doc__)
    started = time.monotonic()
    log = setup_logging()
    noise.install(noise.DRIVER)
    cfg = resolve_local_paths(load_config(None, args.overrides), os.getcwd())
    if not os.path.exists(os.path.join(cfg.data.shards, "manifest.json")):
        log.info("preparing Fashion-MNIST shards in %s", cfg.data.shards)
        if prepare_data.main(["--input", "fashion-mnist", "--output", cfg.data.shards, "--shard-size", "2000"]):
            return 2
    try:
        cfg = prepare_run(cfg)
    except (ConfigError, OSError, ValueError) as error:  # one line, before Ray starts
        return fail(error)
    import ray

    try:
        outcome = start_and_fit(cfg)
        lines, status = conclude(cfg, outcome)
        print("\n".join(lines))
        if status == 0:
            results = os.path.join(os.path.dirname(cfg.checkpoint.storage_path), "eval", f"{cfg.name}.json")
            status = evaluate.main(["--model", outcome.result.checkpoint.path, "--data", f"heldout={cfg.data.shards}",
                                    "--output", results, "--set", f"tracking.uri={cfg.tracking.uri}"])
    finally:
        ray.shutdown()
    print(f"demo wall time: {time.monotonic() - started:.0f} s (shards, Ray start-up, training, evaluation)")
    if status:
        return status
    metrics = json.loads(open(results).read())["results"][0]["metrics"]
    print(f"zero-shot top-5: {metrics['zeroshot_top5']:.3f}\nzero-shot top-1: {metrics['zeroshot_top1']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
