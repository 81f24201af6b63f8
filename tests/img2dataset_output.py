"""Real img2dataset output for tests: Tux Paint's captioned stamps served over HTTP on 127.0.0.1, downloaded,
resized and written as WebDataset shards by the img2dataset CLI itself (installed in its own venv by
``scripts/install_img2dataset.sh``), with a few entries that fail the way dead links do in LAION.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from harness.local_servers import free_port, stop, wait_until_serving

STAMPS = Path("/usr/share/tuxpaint/stamps")  # Debian tuxpaint-stamps-default
VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rayclip" / "img2dataset-venv"


def captioned_stamps(limit: int | None) -> list[tuple[Path, str]]:
    """The first ``limit`` stamps (sorted by path) with their caption: the first non-empty line of NAME.txt."""
    if not STAMPS.is_dir():
        raise RuntimeError(f"{STAMPS} is missing: apt-get install tuxpaint-stamps-default (scripts/install.sh)")
    stamps = []
    for image in sorted(STAMPS.rglob("*.png")):
        text = image.with_suffix(".txt")
        lines = [line.strip() for line in text.read_text(errors="replace").splitlines()] if text.exists() else []
        caption = next((line for line in lines if line), None)
        if caption:
            stamps.append((image, caption))
    return stamps[:limit]


def _serve_folder(stamps: list[tuple[Path, str]], broken: int, served: Path) -> list[dict[str, str]]:
    """Link the stamps into ``served``, add ``broken`` failing entries spread among them; rows without host."""
    served.mkdir(parents=True)
    rows = []
    for index, (image, caption) in enumerate(stamps):
        name = f"{index:05d}-{image.name}"
        (served / name).symlink_to(image)
        rows.append({"url": quote(name), "caption": caption, "stamp": str(image.relative_to(STAMPS))})
    (served / "not-an-image.png").write_text("this file is text, not a PNG\n")
    (served / "empty.png").write_bytes(b"")
    kinds = ["missing-404.png", "not-an-image.png", "empty.png"]  # 404, undecodable, zero bytes
    for i in range(broken):
        rows.insert((i + 1) * len(rows) // (broken + 1), {"url": kinds[i % 3], "caption": f"broken {i}", "stamp": ""})
    return rows


def _img2dataset_command(img2dataset: Path, url_list: Path, shards: Path, image_size: int, per_shard: int) -> list[str]:
    """The CLI call: WebDataset of JPEGs letterboxed to ``image_size``, one process, no wandb."""
    return [
        str(img2dataset), f"--url_list={url_list}", "--input_format=parquet", "--url_col=url",
        "--caption_col=caption", "--save_additional_columns=[stamp]", f"--output_folder={shards}",
        "--output_format=webdataset", "--encode_format=jpg", f"--image_size={image_size}",
        "--resize_mode=border", f"--number_sample_per_shard={per_shard}", "--processes_count=1",
        "--thread_count=4", "--distributor=multiprocessing", "--enable_wandb=False", "--timeout=10",
    ]


def write_img2dataset_shards(
    output_dir: Path, *, samples_per_shard: int = 40, image_size: int = 64, limit: int | None = 160, broken: int = 3
) -> Path:
    """Run img2dataset on ``limit`` real stamps plus ``broken`` failing URLs; return its output folder.

    The folder holds what img2dataset writes: ``NNNNN.tar`` (KEY.jpg, KEY.txt caption, KEY.json metadata with
    url, caption and the extra ``stamp`` column), ``NNNNN.parquet`` (one row per input, failures included) and
    ``NNNNN_stats.json`` per shard. The HTTP server is stopped by its PID whatever happens; a non-zero exit
    raises with the tail of img2dataset's stderr.
    """
    img2dataset = VENV / "bin" / "img2dataset"
    if not img2dataset.exists():
        raise RuntimeError(f"{img2dataset} is missing: run bash scripts/install_img2dataset.sh")
    output_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    rows = _serve_folder(captioned_stamps(limit), broken, output_dir / "served")
    url_list = output_dir / "urls.parquet"
    pq.write_table(pa.Table.from_pylist([{**row, "url": f"http://127.0.0.1:{port}/{row['url']}"} for row in rows]),
                   url_list)
    shards = output_dir / "shards"
    server_log = (output_dir / "http.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(output_dir / "served"),
         str(port)],
        stdout=server_log, stderr=subprocess.STDOUT,
    )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/", server, name="http.server", timeout_s=30)
        command = _img2dataset_command(img2dataset, url_list, shards, image_size, samples_per_shard)
        quiet = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}  # else albumentations asks PyPI at import
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=quiet)
    finally:
        stop(server)
        server_log.close()
    if done.returncode != 0:
        raise RuntimeError(f"img2dataset exited with {done.returncode}:\n{done.stderr[-6000:]}")
    return shards


def img2dataset_successes(folder: Path) -> dict[str, int]:
    """``NNNNN.tar`` -> ``successes`` as img2dataset counted them in each ``NNNNN_stats.json``."""
    return {
        stats.name.removesuffix("_stats.json") + ".tar": json.loads(stats.read_text())["successes"]
        for stats in sorted(Path(folder).glob("*_stats.json"))
    }
