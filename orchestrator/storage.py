"""Local paths and ``s3://`` URLs behind one small interface, so that every data component treats them alike.

S3 reads and listings go through pyarrow's ``S3FileSystem``; S3 writes go through boto3, because pyarrow's
multipart upload fails against moto 5.2.x's CompleteMultipartUpload reply (getmoto/moto#10055) while
boto3's works against moto, MinIO and AWS alike. Both read credentials from the standard AWS chain (env,
profile, instance role); only the endpoint URL (MinIO, moto, ...) may come from configuration. Errors that
mean "this location does not exist" are raised as :class:`StorageError` with the location in the message,
before any work starts.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A location (bucket, prefix, object, folder) is missing or cannot be used."""


@dataclass(frozen=True)
class Location:
    """A folder or object: a filesystem plus the path inside it, and the URL the user gave (for messages)."""

    fs: pafs.FileSystem
    path: str
    url: str
    endpoint_url: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    def child(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.url.rstrip('/')}/{name}",
                        self.endpoint_url)


def default_region() -> str:
    """The AWS region from the standard environment variables (us-east-1 when none is set)."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@functools.lru_cache(maxsize=8)
def s3_filesystem(endpoint_url: str | None, region: str | None = None) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem for AWS or an S3-compatible endpoint; keys come from the AWS chain."""
    region = region or default_region()
    if not endpoint_url:
        return pafs.S3FileSystem(region=region)
    parsed = urlparse(endpoint_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"s3_endpoint_url must look like http(s)://host[:port], got {endpoint_url!r}")
    return pafs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme, region=region)


@functools.lru_cache(maxsize=8)
def s3_client(endpoint_url: str | None, region: str | None = None):
    """The boto3 S3 client for AWS or an S3-compatible endpoint (the one boto3 client factory here)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region)


def resolve(url: str, endpoint_url: str | None = None) -> Location:
    """Turn a local path or ``s3://bucket/prefix`` into a :class:`Location` (no I/O happens here)."""
    if not url:
        raise ValueError("a data location must not be empty")
    if url.startswith("s3://"):
        path = url[len("s3://") :].strip("/")
        if not path:
            raise ValueError(f"S3 URL {url!r} names no bucket")
        return Location(s3_filesystem(endpoint_url), path, "s3://" + path, endpoint_url)
    if "://" in url:
        raise ValueError(f"unsupported URL scheme in {url!r}: use a local path or s3://bucket/prefix")
    path = os.path.abspath(os.path.expanduser(url))
    return Location(pafs.LocalFileSystem(), path, path)


def read_bytes(location: Location) -> bytes:
    with location.fs.open_input_stream(location.path) as stream:
        return stream.read()


def write_bytes(location: Location, data: bytes) -> None:
    """Write an object whole; on local disks via a temporary name + rename so readers never see half a file."""
    if location.is_s3:
        bucket, _, key = location.path.partition("/")
        s3_client(location.endpoint_url).upload_fileobj(io.BytesIO(data), bucket, key)
        return
    parent = os.path.dirname(location.path)
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".{os.path.basename(location.path)}.{uuid.uuid4().hex}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, location.path)


def exists(location: Location) -> bool:
    return location.fs.get_file_info(location.path).type != pafs.FileType.NotFound


def list_names(folder: Location) -> set[str]:
    """Names of the files directly inside ``folder`` (empty if the folder holds nothing)."""
    selector = pafs.FileSelector(folder.path, allow_not_found=True, recursive=False)
    return {info.base_name for info in folder.fs.get_file_info(selector) if info.type == pafs.FileType.File}


def ensure_folder(folder: Location, *, create: bool) -> None:
    """Check that a folder can be used; for S3 the bucket must exist (it is never created here)."""
    if folder.is_s3:
        bucket = folder.path.split("/", 1)[0]
        try:
            bucket_info = folder.fs.get_file_info(bucket)
        except OSError as error:
            raise StorageError(f"cannot reach S3 bucket {bucket!r} for {folder.url}: {error}") from error
        if bucket_info.type == pafs.FileType.NotFound:
            raise StorageError(f"S3 bucket {bucket!r} does not exist (from {folder.url})")
        return
    if create:
        os.makedirs(folder.path, exist_ok=True)
    elif not os.path.isdir(folder.path):
        raise StorageError(f"folder {folder.url} does not exist")


# Ray Train accepts any pyarrow FileSystem: its checkpoint writes are staged in a spooled temporary file and
# uploaded with boto3 on close (multipart for large ZeRO shards), everything else delegates to pyarrow.
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

    def __reduce__(self):  # travels to Ray's controller and workers; clients are rebuilt there
        return Boto3WriteS3Handler, (self.endpoint_url, self.region)

    def _s3(self):
        return s3_client(self.endpoint_url, self.region)

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


def s3_checkpoint_filesystem(endpoint_url: str | None, region: str | None = None) -> pafs.FileSystem:
    """The filesystem Ray Train writes checkpoints through on S3: pyarrow reads, boto3 writes."""
    return pafs.PyFileSystem(Boto3WriteS3Handler(endpoint_url, region or default_region()))
