"""Shard sets and the training data stream: what other packages may use.

Who runs what (module: process):

* ``manifest``, ``sources``, ``writer``: the driver of ``jobs/prepare_data.py`` (shards written by Ray tasks);
* ``shardsets`` (folders, prefixes, brace patterns -> shards with counts) and ``visits`` (what an epoch
  is over weighted sources): the driver and Ray Train's controller; ``index``: ``prepare_data.py --index``;
* ``webdataset``: wherever shards are read (tar members -> samples);
* ``stream``: the process that builds the stream (Ray Train's controller) plans it; its
  :func:`iter_train_batches` runs in each Train worker;
* ``stages``: Ray Data read tasks and decode actors; ``monitor``: the stream's bookkeeping actor;
* ``position``: the typed resumable position, saved in checkpoints;
"""

from orchestrator.config import DataConfig, DataSource  # the sections every stream function takes
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
    ReadAhead,
    stream_counters,
    stream_position,
    stream_visit_names,
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
from orchestrator.data.index import count_shard, index_shards
from orchestrator.data.shardsets import (
    ShardRef,
    SourceShards,
    count_shards,
    expand_spec,
    find_shards,
    resolve_source,
    resolve_sources,
)
from orchestrator.data.stages import SHARD_ID_BITS, DecodeAugmentTokenize, read_shard_rows
from orchestrator.data.stream import TrainStream, build_train_dataset, exact_once_data_config, iter_train_batches, read_ahead_bound
from orchestrator.data.visits import Visit, VisitTable, plan_epochs, shard_order
from orchestrator.data.webdataset import (
    IMAGE_EXTENSIONS,
    RawSample,
    SampleBuilder,
    ShardParse,
    ShardRead,
    decode_image,
    iter_samples,
    parse_shard,
    stream_shard,
)
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
    "IMAGE_EXTENSIONS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_HELDOUT_TEMPLATE",
    "FASHION_MNIST_TEMPLATES",
    "MANIFEST_NAME",
    "REPORT_NAME",
    "SHARD_ID_BITS",
    "DataConfig",
    "DataErrorBudgetExceeded",
    "DataPosition",
    "DataSource",
    "DataStreamMonitor",
    "DecodeAugmentTokenize",
    "Manifest",
    "ManifestError",
    "RawSample",
    "SampleBuilder",
    "ReadAhead",
    "ShardEntry",
    "ShardOptions",
    "ShardParse",
    "ShardProgress",
    "ShardRead",
    "ShardRef",
    "SourceRecord",
    "SourceShards",
    "StreamProgress",
    "TrainStream",
    "Visit",
    "VisitTable",
    "build_shard",
    "build_train_dataset",
    "captioned_folder_records",
    "control_actor_options",
    "count_shard",
    "count_shards",
    "find_shards",
    "index_shards",
    "decode_image",
    "encode_image",
    "exact_once_data_config",
    "expand_spec",
    "fashion_mnist_records",
    "iter_samples",
    "iter_train_batches",
    "load_image",
    "open_shard_set",
    "parse_manifest",
    "parse_shard",
    "plan_epochs",
    "prepare_dataset",
    "prepare_fashion_mnist",
    "prepare_shards",
    "read_ahead_bound",
    "read_idx",
    "read_shard_rows",
    "resize_to_max_side",
    "resolve_source",
    "resolve_sources",
    "shard_order",
    "stream_counters",
    "stream_position",
    "stream_shard",
    "stream_visit_names",
    "table_records",
    "write_manifest",
    "write_shard",
]
