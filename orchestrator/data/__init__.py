"""Shard sets and the training data stream: what other packages may use.

Who runs what (module: process):

* ``manifest``, ``sources``, ``writer``: the driver of ``jobs/prepare_data.py`` (shards written by Ray tasks);
* ``shardsets`` (folders, prefixes, brace patterns -> shards with counts) and ``visits`` (what an epoch
  is over weighted sources): the driver and Ray Train's controller; ``index``: ``prepare_data.py --index``;
* ``webdataset``: wherever shards are read (tar members -> samples);
* ``stream``: the process that builds the stream (Ray Train's controller) plans it; its
  :func:`iter_train_batches` runs in each Train worker;
* ``stages``: Ray Data read tasks and decode actors; ``monitor``: the stream's bookkeeping actor (and
  :func:`data_health_line`, its counters as one line for the console);
* ``position``: the typed resumable position, saved in checkpoints;
"""

from orchestrator.facade import lazy_facade

__all__, __getattr__, __dir__ = lazy_facade(__name__, {
    "orchestrator.config": ("DataConfig", "DataSource"),
    ".manifest": ("MANIFEST_NAME", "Manifest", "ManifestError", "ShardEntry", "open_shard_set", "parse_manifest",
                  "write_manifest"),
    ".monitor": ("DataErrorBudgetExceeded", "DataStreamMonitor", "control_actor_options", "data_health_line",
                 "ReadAhead", "stream_counters", "stream_position", "stream_visit_names"),
    ".position": ("DataPosition", "StreamProgress"),
    ".sources": ("FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "FASHION_MNIST_HELDOUT_TEMPLATE",
                 "FASHION_MNIST_TEMPLATES", "SourceRecord", "captioned_folder_records", "fashion_mnist_records",
                 "read_idx", "table_records"),
    ".index": ("count_shard", "index_shards"),
    ".shardsets": ("ShardRef", "SourceShards", "count_shards", "expand_spec", "find_shards", "resolve_source",
                   "resolve_sources"),
    ".stages": ("SHARD_ID_BITS", "DecodeAugmentTokenize", "read_shard_rows"),
    ".stream": ("TrainStream", "build_train_dataset", "exact_once_data_config", "iter_train_batches",
                "read_ahead_bound"),
    ".visits": ("Visit", "VisitTable", "plan_epochs", "shard_order"),
    ".webdataset": ("IMAGE_EXTENSIONS", "NotATarArchive", "RawSample", "SampleBuilder", "ShardParse", "ShardRead",
                    "TarCutShort", "decode_image", "iter_samples", "parse_shard", "stream_shard"),
    ".writer": ("IMAGE_FORMATS", "REPORT_NAME", "ShardOptions", "ShardProgress", "build_shard", "encode_image",
                "load_image", "prepare_dataset", "prepare_fashion_mnist", "prepare_shards", "resize_to_max_side",
                "write_shard"),
})
