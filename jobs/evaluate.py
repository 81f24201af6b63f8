"""Evaluate a CLIP model: zero-shot classification, retrieval or a linear probe, on Ray, streamed.

    python jobs/evaluate.py --model rayclip-local-20261202-101500 --data data/fashion-mnist
    python jobs/evaluate.py --model ViT-B-32.pt --data /data/imagenet/val      # the paper's ImageNet protocol
    python jobs/evaluate.py --model openai_model.pt --task retrieval --data s3://bench/wds_mscoco_captions

--model: a rayclip run name, run or checkpoint folder, an OpenAI-layout .pt (TorchScript or state dict).
--data: CLIP_benchmark's WebDataset layout, an image-folder tree or rayclip shards, local or s3://.
"""

from __future__ import annotations

import os
import sys

from jobs.cli import fail, parse_evaluate_args
from orchestrator import noise
from orchestrator.config import ConfigError, load_config, output_base_dir, resolve_local_paths
from orchestrator.eval import EvalSetError, ModelSourceError, prepare, run_evaluation
from orchestrator.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    options, args = parse_evaluate_args(argv, __doc__)
    setup_logging()
    noise.install(noise.DRIVER)
    try:  # every input is checked before Ray starts; a mistake is one line naming the file or field, exit 2
        cfg = resolve_local_paths(load_config(args.config, args.overrides), os.getcwd(), output_base_dir())
        loaded, sets = prepare(options, cfg)
    except (ConfigError, EvalSetError, ModelSourceError, OSError, ValueError) as error:
        return fail(error)
    import ray
    try:
        run_evaluation(options, cfg, loaded, sets)
    except EvalSetError as error:  # found while reading: a class index outside the set's class names
        return fail(error)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
