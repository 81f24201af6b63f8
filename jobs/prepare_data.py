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

import sys

from jobs.cli import fail, parse_prepare_args
from orchestrator import noise
from orchestrator.data import ShardOptions, index_shards, prepare_dataset
from orchestrator.logs import setup_logging
from orchestrator.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    args = parse_prepare_args(argv, __doc__)
    setup_logging()
    noise.install(noise.DRIVER)
    try:  # every path, column and bucket is checked before Ray starts
        if args.index:
            spec = args.index if len(args.index) > 1 else args.index[0]
            for location, manifest in index_shards(spec, output=args.output, endpoint_url=args.s3_endpoint_url,
                                                   caption_key=args.caption_key, workers=args.workers).items():
                print(f"{location}: {len(manifest.shards)} shards, {manifest.total_samples} samples, "
                      f"{manifest.total_failed} failed")
        else:
            options = ShardOptions(shard_size=args.shard_size, max_side=args.max_side, image_format=args.image_format)
            for manifest in prepare_dataset(args.input, args.output, options, endpoint_url=args.s3_endpoint_url,
                                            workers=args.workers, image_column=args.image_column,
                                            caption_column=args.caption_column, limit=args.limit):
                print(f"{len(manifest.shards)} shards, {manifest.total_samples} samples, "
                      f"{manifest.total_failed} failed")
    except (OSError, ValueError, StorageError) as error:  # a path, column or bucket that cannot be used
        return fail(f"{'--index: ' if args.index else ''}{error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
