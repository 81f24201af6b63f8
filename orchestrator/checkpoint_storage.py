"""The S3 filesystem Ray Train writes checkpoints through: pyarrow for reads and listings, boto3 for writes.

pyarrow's S3 output streams always finish with CompleteMultipartUpload, whose reply from moto 5.2
(and some S3-compatible stores) pyarrow rejects (getmoto/moto#10055; ``orchestrator/storage.py`` works
around the same thing for shards). Ray Train accepts any ``pyarrow.fs.FileSystem``, so writes are
staged in a spooled temporary file and uploaded with boto3 on close (multipart for large ZeRO shards,
handled by boto3), while everything else delegates to pyarrow's ``S3FileSystem``.
"""

from __future__ import annotations

import tempfile

import pyarrow as pa
import pyarrow.fs as pafs

from orchestrator.storage import s3_filesystem

_SPOOL_BYTES = 64 << 20  # small checkpoint files stay in memory, large ones go to a temporary file


class _UploadOnClose:
    """A writable file object whose contents become the S3 object ``bucket/key`` when it is closed."""

    def __init__(self, client, bucket: str, key: str):
        self._client, self._bucket, self._key = client, bucket, key
        self._buffer = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
        self.closed = False

    def write(self, data) -> int:
        return self._buffer.write(data)

    def flush(self) -> None:
        self._buffer.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._buffer.seek(0)
        try:
            self._client.upload_fileobj(self._buffer, self._bucket, self._key)
        finally:
            self._buffer.close()


class Boto3WriteS3Handler(pafs.FileSystemHandler):
    """``pyarrow.fs.FileSystemHandler`` delegating to an ``S3FileSystem`` except for writes (boto3)."""

    def __init__(self, endpoint_url: str | None, region: str):
        self.endpoint_url, self.region = endpoint_url, region
        self.inner = s3_filesystem(endpoint_url, region)
        self._client = None

    def __reduce__(self):  # travels to Ray's controller and workers; clients are rebuilt there
        return Boto3WriteS3Handler, (self.endpoint_url, self.region)

    def _s3(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)
        return self._client

    def get_type_name(self) -> str:
        return "s3+boto3-writes"

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.inner.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.inner.delete_file(path)

    def move(self, src, dest):
        self.copy_file(src, dest)
        self.inner.delete_file(src)

    def copy_file(self, src, dest):
        source_bucket, _, source_key = src.partition("/")
        bucket, _, key = dest.partition("/")
        self._s3().copy({"Bucket": source_bucket, "Key": source_key}, bucket, key)

    def open_input_stream(self, path):
        return self.inner.open_input_stream(path)

    def open_input_file(self, path):
        return self.inner.open_input_file(path)

    def open_output_stream(self, path, metadata):
        bucket, _, key = path.partition("/")
        return pa.PythonFile(_UploadOnClose(self._s3(), bucket, key), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("S3 objects cannot be appended to")


def s3_checkpoint_filesystem(endpoint_url: str | None, region: str) -> pafs.FileSystem:
    return pafs.PyFileSystem(Boto3WriteS3Handler(endpoint_url, region))
