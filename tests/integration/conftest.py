"""Shared fixtures for integration tests: one fake-credential AWS environment, one real S3 HTTP endpoint
(moto's server in a subprocess on 127.0.0.1) and one local Ray session for the whole test session.

Ray worker processes inherit the environment of the driver at ``ray.init`` time, so ``ray_session``
depends on ``aws_credentials``: every worker then sees the same fake keys the tests use with boto3.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.local_servers import moto_server

REPO_ROOT = Path(__file__).resolve().parents[2]

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def aws_credentials() -> Iterator[dict[str, str]]:
    """Fake AWS credentials in the environment (the standard chain reads them), restored afterwards."""
    saved = {key: os.environ.get(key) for key in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    yield dict(FAKE_AWS_ENV)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint(aws_credentials: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real S3 HTTP endpoint (moto) on 127.0.0.1; the server is stopped by its PID at the end."""
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture(scope="session")
def ray_session(aws_credentials: dict[str, str]) -> Iterator[None]:
    """One local Ray for the whole session (startup costs seconds); workers import this checkout."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(
        address="local",  # always a fresh local Ray, even where `ray start` left a cluster on this machine
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=1 << 30,
        runtime_env={"env_vars": {"PYTHONPATH": python_path, **aws_credentials}},
        logging_level="WARNING",
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def fashion_mnist_shards(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small real Fashion-MNIST shard set (3,000 train images in 6 shards + 3,000 held-out test images)."""
    from orchestrator.data import ShardOptions, prepare_fashion_mnist

    output = str(tmp_path_factory.mktemp("fashion-mnist") / "shards")
    prepare_fashion_mnist(output, ShardOptions(shard_size=500, max_side=28, image_format="png"), limit=3000, workers=2)
    return output


@pytest.fixture
def tiny_run_config(fashion_mnist_shards: str, tmp_path):
    """Factory of a validated small training config (ViT-tiny, 2 CPU workers) with ``--set`` overrides."""
    from orchestrator.config import load_config, resolve_local_paths
    from orchestrator.train import name_run

    def make(*overrides: str):
        base = [
            f"data.shards={fashion_mnist_shards}",
            "data.decode_concurrency=1",
            "data.shuffle_buffer=256",
            "deepspeed.micro_batch_size=64",
            "schedule.warmup_steps=2",
            "schedule.total_steps=8",
            "optim.lr=2e-3",
            "checkpoint.every_steps=4",
            f"checkpoint.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.log_every_steps=1",
            "eval.max_images=500",
        ]
        return name_run(resolve_local_paths(load_config(None, base + list(overrides)), tmp_path))

    return make


@pytest.fixture(scope="session")
def img2dataset_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real img2dataset WebDataset output (5 shards of up to 40 Tux Paint stamps, 3 failed entries), made once."""
    from tests.img2dataset_output import write_img2dataset_shards

    return write_img2dataset_shards(tmp_path_factory.mktemp("img2dataset"))
