"""Features on Ray Data for ``jobs/evaluate.py``: read + preprocess tasks, then actors that hold the model.

    parts of the set ──> read (Ray tasks) ──> decode + center crop (Ray tasks, CPU) ──> encode (actor pool:
    a GPU each when the cluster has GPUs) ──> the driver, batch by batch

The set is streamed: a read task holds one block of a part, the actors one batch, and the driver only what
its task keeps (zero-shot: counts; retrieval and the probe: E floats a sample). Bad samples travel as rows
with ``error`` set, so the driver counts them by kind. The model travels once, as an OpenAI-layout state
dict in Ray's object store, to every actor.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from models import CLIP, ModelSpec
from orchestrator.eval.encode import FeatureEncoder, Preprocess
from orchestrator.eval.readers import read_part
from orchestrator.eval.sets import EvalSet, EvalSetError, SetPart
from orchestrator.eval.tasks import ImageBatch
from orchestrator import noise
from orchestrator.logs import get_logger

logger = get_logger("eval")
PROGRESS_EVERY_S = 15.0
READ_TASK_CPUS = 0.25  # a read task mostly waits on storage


def read_rows(rows: dict[str, np.ndarray], *, eval_set: EvalSet) -> Iterator[dict]:
    """Ray Data read task: one part in, its samples out as encoded bytes in blocks (error rows for bad ones)."""
    for block in read_part(eval_set, SetPart(**json.loads(rows["part"][0]))):
        yield {
            "image": np.array([sample.image for sample in block], dtype=object),
            "label": np.array([sample.label for sample in block], dtype=np.int64),
            "sample_id": np.array([sample.sample_id for sample in block], dtype=np.int64),
            "captions": np.array(["\n".join(sample.captions) for sample in block], dtype=object),
            "error": np.array([sample.error for sample in block], dtype=object),
        }


def preprocess_rows(batch: dict[str, np.ndarray], *, image_size: int) -> dict[str, np.ndarray]:
    """Ray Data decode task: encoded images -> uint8 (B, 3, R, R) pixels; an undecodable one becomes an error row."""
    errors = list(batch["error"])
    good_rows = [row for row, error in enumerate(errors) if not error]
    pixels = Preprocess(image_size)([batch["image"][row] for row in good_rows])
    out = np.zeros((len(errors), 3, image_size, image_size), dtype=np.uint8)  # error rows stay zero
    out[[row for row, ok in zip(good_rows, pixels.decoded) if ok]] = pixels.images.numpy()
    for row, ok in zip(good_rows, pixels.decoded):
        if not ok:
            errors[row] = "undecodable_image"
    return {"pixels": out, "label": batch["label"], "sample_id": batch["sample_id"], "captions": batch["captions"],
            "error": np.array(errors, dtype=object)}


class EncodeOnActor:
    """Ray Data actor: the model (rebuilt from the object store, on a GPU when it was given one) encoding
    image rows (``pixels``, with their ``captions`` when asked) or text rows (``text``)."""

    def __init__(self, state: list, spec: dict, *, bf16: bool, threads: int, captions: bool = False):
        import ray

        torch.set_num_threads(threads)
        model = CLIP(ModelSpec.from_dict(spec))
        model.load_openai_state_dict(ray.get(state[0]))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = FeatureEncoder(model.to(device).eval(), device=device, bf16=bf16 and device == "cuda")
        self.captions = captions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "text" in batch:
            return {"index": batch["index"], "features": self.encoder.text_features(list(batch["text"])).numpy()}
        good = np.array([not error for error in batch["error"]], dtype=bool)
        features = self.encoder.image_features(torch.from_numpy(batch["pixels"][good]))
        out = np.zeros((len(good), features.shape[1]), dtype=np.float32)
        out[good] = features.numpy()
        result = {key: batch[key] for key in ("label", "sample_id", "error")}
        result["features"] = out
        if self.captions:
            texts = [str(batch["captions"][row]).split("\n") if good[row] else [] for row in range(len(good))]
            flat = self.encoder.text_features([text for row in texts for text in row])
            split = flat.split([len(row) for row in texts])
            column = np.empty(len(split), dtype=object)  # ragged: (captions, E) per image
            column[:] = [part.numpy() for part in split]
            result["caption_features"] = column
        return result


class RayDataFeatures:
    """The feature source of ``jobs/evaluate.py``: Ray Data over the set, ``encoders`` model actors."""

    def __init__(self, model: CLIP, *, encoders: int, batch_size: int, use_gpu: bool, bf16: bool,
                 threads_per_encoder: int = 1):
        import ray

        noise.install(noise.DATA_DRIVER)
        self.state = ray.put({key: value.detach().cpu() for key, value in model.openai_state_dict().items()})
        self.spec = model.spec.to_dict()
        self.image_size = model.image_size
        self.encoders, self.batch_size, self.use_gpu, self.bf16 = encoders, batch_size, use_gpu, bf16
        self.threads = threads_per_encoder

    def _encode(self, dataset, *, captions: bool = False):
        import ray

        return dataset.map_batches(
            EncodeOnActor, batch_size=self.batch_size, compute=ray.data.ActorPoolStrategy(size=self.encoders),
            num_gpus=1 if self.use_gpu else 0, num_cpus=1 if self.use_gpu else self.threads,
            fn_constructor_kwargs=dict(state=[self.state], spec=self.spec, bf16=self.bf16, threads=self.threads,
                                       captions=captions),
            # A lost actor fails the evaluation (rerun it) instead of restarting: a restarted actor could not
            # count on its constructor's arguments (the model) still being in the object store (ray #53727).
            # Ray 2.60 deprecates max_restarts as an extra argument and names no parameter for it (noise.py).
            max_restarts=0)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        import ray

        rows = ray.data.from_items([{"index": i, "text": text} for i, text in enumerate(texts)])
        indices, features = [], []
        for batch in self._encode(rows).iter_batches(batch_size=None, batch_format="numpy"):
            indices.append(batch["index"])
            features.append(batch["features"])
        order = np.argsort(np.concatenate(indices))
        return torch.from_numpy(np.concatenate(features)[order])

    def image_batches(self, eval_set: EvalSet, *, captions: bool = False) -> Iterator[ImageBatch]:
        import ray

        parts = ray.data.from_items([{"part": json.dumps(dataclasses.asdict(part))} for part in eval_set.parts],
                                    override_num_blocks=len(eval_set.parts))
        # Reading and decoding are separate stages (their CPU shares differ, so Ray Data does not fuse them):
        # decoding spreads over as many tasks as the cluster has CPUs, however few shards the set has.
        rows = (parts
                .map_batches(read_rows, batch_size=1, num_cpus=READ_TASK_CPUS,
                             fn_kwargs=dict(eval_set=dataclasses.replace(eval_set, parts=[])))
                .map_batches(preprocess_rows, batch_size=self.batch_size, num_cpus=1,
                             fn_kwargs=dict(image_size=self.image_size)))
        progress = _Progress(eval_set)
        for batch in _reraising_set_errors(self._encode(rows, captions=captions).iter_batches(batch_size=None,
                                                                                             batch_format="numpy")):
            good = np.array([not error for error in batch["error"]], dtype=bool)
            bad = Counter(str(error) for error in batch["error"] if error)
            result = ImageBatch(torch.from_numpy(batch["features"][good]), torch.from_numpy(batch["label"][good]),
                                torch.from_numpy(batch["sample_id"][good]), bad=bad)
            if captions:
                # each image's caption rows are read-only views into Arrow's buffer: copied, as torch wants them
                result.caption_features = [torch.tensor(f) for f, ok in zip(batch["caption_features"], good) if ok]
            progress.add(len(good))
            yield result
        progress.done()

    def sum_over_ranks(self, totals: torch.Tensor) -> torch.Tensor:
        return totals  # one process sees every batch

    def gather_to_chief(self, value):
        return [value]


def _reraising_set_errors(batches: Iterator[dict]) -> Iterator[dict]:
    """The batches; a set error raised in a read task (a class index out of range) comes out as itself,
    one line naming the file, not as Ray's wrapper with the remote traceback."""
    try:
        yield from batches
    except EvalSetError as error:
        cause = getattr(error, "cause", None)  # ray's RayTaskError(EvalSetError) carries the original
        original = cause if isinstance(cause, EvalSetError) else error
        raise EvalSetError(str(original).splitlines()[0]) from None


class _Progress:
    """A line every ``PROGRESS_EVERY_S`` seconds: images so far, rate and (when the size is known) ETA."""

    def __init__(self, eval_set: EvalSet):
        self.name, self.total = eval_set.name, eval_set.samples
        self.started = self.last = time.monotonic()
        self.images = 0

    def add(self, images: int) -> None:
        self.images += images
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = self.images / max(now - self.started, 1e-9)
        if self.total:
            eta = (self.total - self.images) / max(rate, 1e-9)
            logger.info("%s: %d/%d images, %.0f images/s, ETA %.0f s", self.name, self.images, self.total, rate, eta)
        else:
            logger.info("%s: %d images, %.0f images/s", self.name, self.images, rate)

    def done(self) -> None:
        elapsed = time.monotonic() - self.started
        logger.info("%s: %d images encoded in %.1f s (%.0f images/s)", self.name, self.images, elapsed,
                    self.images / max(elapsed, 1e-9))
