"""The README demo: Fashion-MNIST shards -> CLIP pretraining with the default config -> zero-shot accuracy.

    python jobs/demo.py            # about 7 minutes on a 2-core laptop, CPU only

Training captions use several templates ("a picture of a {}.", ...); the zero-shot classifier uses the
held-out "a photo of a {}." on the 10,000 test images, which training never sees. The run's exported model
is then evaluated as a user would, with ``jobs/evaluate.py``; the last line is ``zero-shot top-1: 0.NNN``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from jobs import evaluate, prepare_data  # noqa: E402
from orchestrator.config import load_config, resolve_local_paths  # noqa: E402
from orchestrator.logs import setup_logging  # noqa: E402
from orchestrator.train import build_trainer, check_inputs, describe_result, init_ray, name_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    started = time.monotonic()
    log = setup_logging()
    cfg = name_run(resolve_local_paths(load_config(None, args.overrides), os.getcwd()))
    if not os.path.exists(os.path.join(cfg.data.shards, "manifest.json")):
        log.info("preparing Fashion-MNIST shards in %s", cfg.data.shards)
        prepare_data.main(["--input", "fashion-mnist", "--output", cfg.data.shards, "--shard-size", "2000"])
    check_inputs(cfg)
    import ray

    init_ray(cfg)
    try:
        result = build_trainer(cfg).fit()
        print(describe_result(cfg, result))
        results = os.path.join(os.path.dirname(cfg.checkpoint.storage_path), "eval", f"{cfg.name}.json")
        status = evaluate.main(["--model", result.checkpoint.path, "--data", f"heldout={cfg.data.shards}",
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
