"""Shard sets and the training data stream: what other packages may use.

Who runs what (module: process):

* ``manifest``, ``sources``, ``writer``: the driver of ``jobs/prepare_data.py`` (shards written by Ray tasks);
* ``webdataset``: wherever shards are read (tar members -> samples);
* ``stream``: the process that builds the stream (Ray Train's controller) plans it; its
  :func:`iter_train_batches` runs in each Train worker;
* ``stages``: Ray Data read tasks and decode actors; ``monitor``: the stream's bookkeeping actor;
* ``position``: the typed resumable position, saved in checkpoints;
* ``heldout``: the labelled evaluation split, read whole on a worker or the driver.
"""

from orchestrator.config import DataConfig  # the section every stream function takes
from orchestrator.data.heldout import HeldoutSplit, load_heldout
from orchestrator.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ShardEntry,
    open_shard_set,
    parse_manifest,
    write_manifest,
)
from orchestrator.data.monitor import (
    DataErrorBudgetExceeded,
    DataStreamMonitor,
    control_actor_options,
    stream_counters,
    stream_position,
)
from orchestrator.data.position import DataPosition, StreamProgress
from orchestrator.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_HELDOUT_TEMPLATE,
    FASHION_MNIST_TEMPLATES,
    SourceRecord,
    captioned_folder_records,
    fashion_mnist_records,
    read_idx,
    table_records,
)
from orchestrator.data.stages import SHARD_ID_BITS, DecodeAugmentTokenize, read_shard_rows
from orchestrator.data.stream import TrainStream, build_train_dataset, exact_once_data_config, iter_train_batches, plan_epochs, shard_order
from orchestrator.data.webdataset import RawSample, ShardParse, decode_image, fetch_shard, parse_shard
from orchestrator.data.writer import (
    REPORT_NAME,
    ShardOptions,
    ShardProgress,
    build_shard,
    encode_image,
    load_image,
    prepare_dataset,
    prepare_fashion_mnist,
    prepare_shards,
    resize_to_max_side,
    write_shard,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_HELDOUT_TEMPLATE",
    "FASHION_MNIST_TEMPLATES",
    "MANIFEST_NAME",
    "REPORT_NAME",
    "SHARD_ID_BITS",
    "DataConfig",
    "DataErrorBudgetExceeded",
    "DataPosition",
    "DataStreamMonitor",
    "DecodeAugmentTokenize",
    "HeldoutSplit",
    "Manifest",
    "ManifestError",
    "RawSample",
    "ShardEntry",
    "ShardOptions",
    "ShardParse",
    "ShardProgress",
    "SourceRecord",
    "StreamProgress",
    "TrainStream",
    "build_shard",
    "build_train_dataset",
    "captioned_folder_records",
    "control_actor_options",
    "decode_image",
    "encode_image",
    "exact_once_data_config",
    "fashion_mnist_records",
    "fetch_shard",
    "iter_train_batches",
    "load_heldout",
    "load_image",
    "open_shard_set",
    "parse_manifest",
    "parse_shard",
    "plan_epochs",
    "prepare_dataset",
    "prepare_fashion_mnist",
    "prepare_shards",
    "read_idx",
    "read_shard_rows",
    "resize_to_max_side",
    "shard_order",
    "stream_counters",
    "stream_position",
    "table_records",
    "write_manifest",
    "write_shard",
]
