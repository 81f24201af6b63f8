"""Write captioned images as WebDataset shards (img2dataset layout), or index shards that exist already.

    python jobs/prepare_data.py --input /usr/share/tuxpaint/stamps --output /tmp/shards/tuxpaint
    python jobs/prepare_data.py --input captions.csv --image-column path --caption-column text --output s3://b/p
    python jobs/prepare_data.py --input fashion-mnist --output data/fashion-mnist --shard-size 5000
    python jobs/prepare_data.py --index 's3://b/laion400m/{00000..41455}.tar' [--output s3://writable/laion]

Re-running keeps the shards already complete; unreadable images are listed in <output>/prepare_report.json.
--index counts shards another tool wrote (img2dataset, webdataset) on Ray and writes manifest.json
beside them (or to --output, a folder or .json file, when the bucket is read-only).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from orchestrator.data import ShardOptions, index_shards, prepare_dataset  # noqa: E402
from orchestrator.logs import setup_logging  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="captioned folder, table (.csv/.jsonl/.parquet) or 'fashion-mnist'")
    what.add_argument("--index", nargs="+", metavar="SHARDS", help="shards to count: folders, prefixes, brace patterns")
    parser.add_argument("--output", help="folder or s3://bucket/prefix (bucket must exist); --index: manifest place")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--max-side", type=int, default=256, help="cap on the longest side (aspect kept)")
    parser.add_argument("--image-format", default="jpg", choices=["jpg", "png", "webp"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="shard tasks in flight")
    parser.add_argument("--s3-endpoint-url", default=None, help="MinIO/moto endpoint; keys come from the AWS chain")
    parser.add_argument("--image-column", default="image", help="table column with the image path or s3:// URL")
    parser.add_argument("--caption-column", default="caption", help="table column with the caption")
    parser.add_argument("--caption-key", default=None, help="--index: caption from this KEY.json field (data.caption_key)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N inputs (fashion-mnist: per split)")
    args = parser.parse_args(argv)
    if args.input and not args.output:
        parser.error("--input needs --output")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    if args.index:
        spec = args.index if len(args.index) > 1 else args.index[0]
        for location, manifest in index_shards(spec, output=args.output, endpoint_url=args.s3_endpoint_url,
                                               caption_key=args.caption_key, workers=args.workers).items():
            print(f"{location}: {len(manifest.shards)} shards, {manifest.total_samples} samples, "
                  f"{manifest.total_failed} failed")
        return
    options = ShardOptions(shard_size=args.shard_size, max_side=args.max_side, image_format=args.image_format)
    manifests = prepare_dataset(args.input, args.output, options, endpoint_url=args.s3_endpoint_url,
                                workers=args.workers, image_column=args.image_column,
                                caption_column=args.caption_column, limit=args.limit)
    for manifest in manifests:
        print(f"{len(manifest.shards)} shards, {manifest.total_samples} samples, {manifest.total_failed} failed")


if __name__ == "__main__":
    main()
