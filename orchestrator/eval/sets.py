"""Evaluation sets as they are published: what a set is, found from a path (local or ``s3://``) before any work.

Three layouts, told apart by what the folder holds (``layout: auto``), or named:

* ``clip_benchmark``: CLIP_benchmark's WebDataset layout, as LAION publishes the benchmark sets and
  ``clip_benchmark.webdataset_builder`` writes them: ``classnames.txt``, ``zeroshot_classification_templates.txt``
  (``{c}`` slots), ``dataset_type.txt`` (``retrieval`` for caption sets), ``<split>/nshards.txt`` and
  ``<split>/0.tar ...`` holding ``KEY.webp|png|jpg`` with ``KEY.cls`` (class index) or ``KEY.txt`` (one caption
  per line). The path is the set's root or one split folder of it.
* ``image_folder``: ImageNet's layout, ``<split>/<class folder>/*.JPEG``; the class index is the folder's place in
  sorted order (torchvision's ``ImageFolder`` rule). Class names come from ``--classnames`` / ``classnames.txt``
  (one per line, in that order), else from the shipped ImageNet-1k names when the folders are WordNet ids, else
  from the folder names. The path is a split folder (class folders inside) or a root holding split folders.
* ``rayclip``: shards written by ``prepare_data.py`` whose manifest names the classes (``extra.class_names``):
  the root's ``heldout/`` split is ``test`` (with its held-out template), the root itself ``train``.

A set is split into parts (a tar shard, or a few hundred image files) that readers stream one at a time;
nothing here reads an image.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from dataclasses import dataclass, field
from typing import Literal

import pyarrow.fs as pafs

from models import IMAGENET_TEMPLATES, imagenet_classes
from orchestrator import storage
from orchestrator.data import MANIFEST_NAME, ManifestError, open_shard_set

Layout = Literal["clip_benchmark", "image_folder", "rayclip"]
LAYOUTS = ("auto", "clip_benchmark", "image_folder", "rayclip")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FILES_PER_PART = 256  # image-folder files read by one part (a read task's unit of work)
SPLIT_NAMES = ("test", "val", "validation", "heldout", "train")
_WNID = re.compile(r"n\d{8}")


class EvalSetError(ValueError):
    """An evaluation set that cannot be used; the message names the file or folder and what is wrong."""


@dataclass(frozen=True)
class SetPart:
    """One unit of reading: a WebDataset tar, or a run of image files with their class indices."""

    index: int
    url: str = ""
    files: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    samples: int | None = None
    """Samples in the part where the layout records it (rayclip manifests); None otherwise."""
    limit: int | None = None
    """Read only the first this many samples (``max_images``)."""


@dataclass
class EvalSet:
    """One split of an evaluation set, ready to read: its parts, classes and prompt templates."""

    name: str
    layout: Layout
    kind: Literal["classification", "retrieval"]
    split: str
    url: str
    """The split's folder, for messages."""
    parts: list[SetPart]
    class_names: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    """Prompt templates with a ``{}`` slot (the set's own, else the paper's 80 ImageNet templates)."""
    classnames_url: str = ""
    """Where the class names came from, for messages."""
    endpoint_url: str | None = None
    samples: int | None = None
    """Sample count where the layout records it (rayclip manifests, image folders); None otherwise."""


def set_name_for(url: str) -> str:
    """A readable set name from its path: the folder's name, or its parent's when the folder is a split."""
    parts = [part for part in url.rstrip("/").split("/") if part]
    if len(parts) >= 2 and parts[-1].lower() in SPLIT_NAMES:
        return f"{parts[-2]}-{parts[-1]}"
    return parts[-1] if parts else url


def open_eval_set(url: str, *, name: str | None = None, layout: str = "auto", split: str = "test",
                  classnames: str | None = None, endpoint_url: str | None = None) -> EvalSet:
    """Find the set at ``url`` (a root or split folder, local or S3) and list its parts; raises
    :class:`EvalSetError` naming the file that is missing or wrong."""
    if layout not in LAYOUTS:
        raise EvalSetError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    folder = storage.resolve(url, endpoint_url)
    if not storage.exists(folder):
        raise EvalSetError(f"{folder.url}: no such folder")
    found = _detect_layout(folder, split) if layout == "auto" else layout
    name = name or set_name_for(url)
    opener = {"clip_benchmark": _open_clip_benchmark, "image_folder": _open_image_folder, "rayclip": _open_rayclip}[found]
    return opener(folder, name=name, split=split, classnames=classnames)


def _detect_layout(folder: storage.Location, split: str) -> Layout:
    names = _entries(folder)
    # Split folders by name only: an ImageNet tree's 1,000 class folders would cost 1,000 requests on S3.
    splits = names & {split, *SPLIT_NAMES}
    if "nshards.txt" in names or any(_is_file(folder.child(f"{entry}/nshards.txt")) for entry in splits):
        return "clip_benchmark"
    if MANIFEST_NAME in names:
        return "rayclip"
    if any(entry for entry in names if "." not in entry):
        return "image_folder"
    raise EvalSetError(f"{folder.url}: not an evaluation set (no nshards.txt of CLIP_benchmark's layout, no "
                       f"rayclip {MANIFEST_NAME}, no class folders); give the set's root or split folder")


def _entries(folder: storage.Location) -> set[str]:
    selector = pafs.FileSelector(folder.path, allow_not_found=True, recursive=False)
    return {info.base_name for info in folder.fs.get_file_info(selector)}


def _parent(location: storage.Location) -> storage.Location:
    return storage.Location(location.fs, posixpath.dirname(location.path.rstrip("/")),
                            location.url.rstrip("/").rsplit("/", 1)[0], location.endpoint_url)


def _is_file(location: storage.Location) -> bool:
    return location.fs.get_file_info(location.path).type == pafs.FileType.File


def _read_lines(location: storage.Location) -> list[str] | None:
    """Non-empty stripped lines of a text file, or None when it does not exist."""
    if not _is_file(location):
        return None
    return [line.strip() for line in storage.read_bytes(location).decode("utf-8").splitlines() if line.strip()]


def as_template(text: str, where: str) -> str:
    """A prompt template with rayclip's ``{}`` slot; CLIP_benchmark writes ``{c}``."""
    template = text.replace("{c}", "{}")
    if "{}" not in template:
        raise EvalSetError(f"{where}: template {text!r} has no '{{}}' or '{{c}}' slot for the class name")
    return template


def read_templates(location: storage.Location) -> list[str] | None:
    lines = _read_lines(location)
    return None if lines is None else [as_template(line, location.url) for line in lines]


def _open_clip_benchmark(folder: storage.Location, *, name: str, split: str, classnames: str | None) -> EvalSet:
    if _is_file(folder.child("nshards.txt")):  # a split folder was given: the metadata is one level up
        split, root = posixpath.basename(folder.path.rstrip("/")), _parent(folder)
    else:
        root = folder
    split_folder = root.child(split)
    counts = _read_lines(split_folder.child("nshards.txt"))
    if not counts or not counts[0].isdigit():
        raise EvalSetError(f"{split_folder.url}/nshards.txt: missing or not a shard count (split {split!r}; "
                           f"splits here: {', '.join(sorted(e for e in _entries(root) if '.' not in e)) or 'none'})")
    parts = [SetPart(index, url=split_folder.child(f"{index}.tar").url) for index in range(int(counts[0]))]
    kind_lines = _read_lines(root.child("dataset_type.txt")) or ["classification"]
    kind = "retrieval" if kind_lines[0].lower() == "retrieval" else "classification"
    if kind_lines[0].lower() == "multilabel":
        raise EvalSetError(f"{root.url}/dataset_type.txt: multilabel sets are not supported (zero-shot, retrieval "
                           "and linear probe here are single-label)")
    result = EvalSet(name, "clip_benchmark", kind, split, split_folder.url, parts, endpoint_url=folder.endpoint_url)
    if kind == "classification":
        result.class_names, result.classnames_url = _class_names_file(root, classnames, "classnames.txt")
        result.templates = read_templates(root.child("zeroshot_classification_templates.txt")) or list(IMAGENET_TEMPLATES)
    return result


def _class_names_file(root: storage.Location, override: str | None, default_name: str) -> tuple[list[str], str]:
    location = storage.resolve(override, root.endpoint_url) if override else root.child(default_name)
    names = _read_lines(location)
    if not names:
        raise EvalSetError(f"{location.url}: the set has no class names (this file is missing or empty); "
                           "classification needs one name per line in class-index order (or --classnames FILE)")
    return names, location.url


def _open_image_folder(folder: storage.Location, *, name: str, split: str, classnames: str | None) -> EvalSet:
    files = _image_files(folder)
    split_folder = folder
    if not any(_depth(folder, path) == 2 for path in files):  # no <class>/<image> here: a root of split folders
        split_folder = folder.child(split)
        files = _image_files(split_folder)
    classes = sorted({posixpath.basename(posixpath.dirname(path)) for path in files
                      if posixpath.dirname(posixpath.dirname(path)) == split_folder.path.rstrip("/")})
    if not classes:
        raise EvalSetError(f"{split_folder.url}: no class folders with images ({', '.join(IMAGE_SUFFIXES)})")
    index = {folder_name: label for label, folder_name in enumerate(classes)}
    labelled = sorted((path, index[posixpath.basename(posixpath.dirname(path))]) for path in files
                      if posixpath.basename(posixpath.dirname(path)) in index)
    parts = [SetPart(start // FILES_PER_PART,
                     files=tuple(_url_of(split_folder, path) for path, _ in labelled[start:start + FILES_PER_PART]),
                     labels=tuple(label for _, label in labelled[start:start + FILES_PER_PART]))
             for start in range(0, len(labelled), FILES_PER_PART)]
    class_names, source = _image_folder_class_names(folder, split_folder, classes, classnames)
    if len(class_names) != len(classes):
        raise EvalSetError(f"{source}: {len(class_names)} class names for the {len(classes)} class folders of "
                           f"{split_folder.url}; one name per folder, in sorted folder order")
    templates = next((found for found in (read_templates(place.child("zeroshot_classification_templates.txt"))
                                          for place in (split_folder, _parent(split_folder))) if found),
                     list(IMAGENET_TEMPLATES))
    return EvalSet(name, "image_folder", "classification", posixpath.basename(split_folder.path.rstrip("/")),
                   split_folder.url, parts, class_names, templates, source, folder.endpoint_url, len(labelled))


def _image_files(folder: storage.Location) -> list[str]:
    selector = pafs.FileSelector(folder.path, allow_not_found=True, recursive=True)
    return [info.path for info in folder.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.path.lower().endswith(IMAGE_SUFFIXES)]


def _depth(folder: storage.Location, path: str) -> int:
    """Path components of ``path`` below ``folder`` (``<class>/<image>`` is 2)."""
    return len(path[len(folder.path.rstrip("/")):].strip("/").split("/"))


def _url_of(folder: storage.Location, path: str) -> str:
    return folder.url.rstrip("/") + path[len(folder.path.rstrip("/")):]


def _image_folder_class_names(root: storage.Location, split_folder: storage.Location, classes: list[str],
                              override: str | None) -> tuple[list[str], str]:
    """Names from the given file, a ``classnames.txt`` (in the split folder, else beside it), ImageNet's, or the
    folder names."""
    if override:
        return _class_names_file(root, override, "")
    for candidate in (split_folder.child("classnames.txt"), _parent(split_folder).child("classnames.txt")):
        names = _read_lines(candidate)
        if names:
            return names, candidate.url
    if all(_WNID.fullmatch(folder_name) for folder_name in classes):
        known = dict(imagenet_classes())
        missing = [wnid for wnid in classes if wnid not in known]
        if not missing:
            return [known[wnid] for wnid in classes], "rayclip's ImageNet-1k class names (models/imagenet_classes.tsv)"
    return [folder_name.replace("_", " ") for folder_name in classes], f"the folder names of {split_folder.url}"


def _open_rayclip(folder: storage.Location, *, name: str, split: str, classnames: str | None) -> EvalSet:
    test_names = {"test", "val", "validation", "heldout"}
    heldout = folder.child("heldout")
    chosen = heldout if split in test_names and storage.exists(heldout.child(MANIFEST_NAME)) else folder
    if split not in test_names | {"train"}:
        raise EvalSetError(f"{folder.url}: rayclip shards have splits 'test' (heldout/) and 'train', not {split!r}")
    try:
        shard_folder, manifest = open_shard_set(chosen.url, folder.endpoint_url)
    except (ManifestError, storage.StorageError, OSError) as error:
        raise EvalSetError(f"{chosen.url}: {error}") from None
    parts = [SetPart(index, url=shard_folder.child(shard.name).url, samples=shard.samples)
             for index, shard in enumerate(manifest.shards)]
    result = EvalSet(name, "rayclip", "classification", split, shard_folder.url, parts,
                     endpoint_url=folder.endpoint_url, samples=manifest.total_samples)
    names = manifest.extra.get("class_names")
    if classnames:
        result.class_names, result.classnames_url = _class_names_file(folder, classnames, "")
    elif names:
        result.class_names, result.classnames_url = list(names), f"{shard_folder.url}/{MANIFEST_NAME} (extra.class_names)"
    else:
        result.kind = "retrieval"  # captioned shards without classes: one caption per image
    template = manifest.extra.get("template")
    result.templates = [as_template(template, shard_folder.url)] if template else list(IMAGENET_TEMPLATES)
    return result


def for_task(eval_set: EvalSet, task: str) -> EvalSet:
    """The set as ``task`` reads it, or :class:`EvalSetError` when the set cannot serve that task."""
    if task in ("zeroshot", "linear-probe"):  # class names needed; retrieval and the loss need captions
        if eval_set.kind != "classification":
            raise EvalSetError(f"{eval_set.url}: a caption set without class names cannot be evaluated with task "
                               f"{task!r}; allowed: task 'retrieval', or a set with class names")
        return eval_set
    if eval_set.kind == "retrieval":
        return eval_set
    if eval_set.layout == "rayclip":  # captioned shards: each image with its one caption
        return dataclasses.replace(eval_set, kind="retrieval")
    raise EvalSetError(f"{eval_set.url}: a {eval_set.layout} classification set has no captions for task {task!r}; "
                       "allowed: CLIP_benchmark's retrieval layout (dataset_type.txt 'retrieval') or rayclip shards")


def describe(eval_set: EvalSet) -> str:
    """One line for the log: what was found where."""
    size = f"{eval_set.samples} images" if eval_set.samples is not None else f"{len(eval_set.parts)} shards"
    classes = f", {len(eval_set.class_names)} classes, {len(eval_set.templates)} templates" if eval_set.class_names else ""
    return f"{eval_set.name}: {eval_set.layout} {eval_set.kind} split {eval_set.split!r} at {eval_set.url} ({size}{classes})"
