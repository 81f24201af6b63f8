"""Write captioned images as WebDataset shards (img2dataset layout) to a folder or s3://bucket/prefix.

    python jobs/prepare_data.py --input /usr/share/tuxpaint/stamps --output /tmp/shards/tuxpaint
    python jobs/prepare_data.py --input captions.csv --image-column path --caption-column text --output s3://b/p
    python jobs/prepare_data.py --input fashion-mnist --output data/fashion-mnist --shard-size 5000

Re-running with the same inputs and options keeps the shards already complete. Unreadable images are
skipped and listed in <output>/prepare_report.json; the manifest counts them.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from orchestrator.data import ShardOptions, prepare_dataset  # noqa: E402
from orchestrator.logs import setup_logging  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="captioned folder, table (.csv/.jsonl/.parquet) or 'fashion-mnist'")
    parser.add_argument("--output", required=True, help="folder or s3://bucket/prefix (the bucket must exist)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--max-side", type=int, default=256, help="cap on the longest side (aspect kept)")
    parser.add_argument("--image-format", default="jpg", choices=["jpg", "png", "webp"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="shard tasks in flight")
    parser.add_argument("--s3-endpoint-url", default=None, help="MinIO/moto endpoint; keys come from the AWS chain")
    parser.add_argument("--image-column", default="image", help="table column with the image path or s3:// URL")
    parser.add_argument("--caption-column", default="caption", help="table column with the caption")
    parser.add_argument("--limit", type=int, default=None, help="only the first N inputs (fashion-mnist: per split)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    options = ShardOptions(shard_size=args.shard_size, max_side=args.max_side, image_format=args.image_format)
    manifests = prepare_dataset(args.input, args.output, options, endpoint_url=args.s3_endpoint_url,
                                workers=args.workers, image_column=args.image_column,
                                caption_column=args.caption_column, limit=args.limit)
    for manifest in manifests:
        print(f"{len(manifest.shards)} shards, {manifest.total_samples} samples, {manifest.total_failed} failed")


if __name__ == "__main__":
    main()
