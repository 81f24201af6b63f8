"""Evaluation sets found from a path (CLIP_benchmark, image folders, rayclip shards) and read as samples.

The sets are written by hand here, a few members each; the clip-benchmark writer's own output is checked
in ``tests/integration/test_clip_benchmark_sets.py``.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from models import IMAGENET_TEMPLATES
from orchestrator.data import MANIFEST_NAME, Manifest, ShardEntry, write_manifest
from orchestrator import storage
from orchestrator.eval import sets as sets_module
from orchestrator.eval import EvalSetError, for_task, limit_set, open_eval_set, read_part


def png(shade: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (shade, shade, shade)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def labelled(key: str, label: int | str) -> list[tuple[str, bytes]]:
    """One CLIP_benchmark classification sample: ``KEY.png`` + ``KEY.cls``."""
    return [(f"{key}.png", png()), (f"{key}.cls", str(label).encode())]


def clip_benchmark_set(root: Path, shards: list[list[tuple[str, bytes]]], *, split: str = "test",
                       classnames: list[str] | None = ("cat", "dog"), templates: list[str] | None = None,
                       dataset_type: str | None = None) -> Path:
    """CLIP_benchmark's WebDataset layout: metadata at the root, ``<split>/nshards.txt`` + ``<split>/N.tar``."""
    (root / split).mkdir(parents=True, exist_ok=True)
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if dataset_type is not None:
        (root / "dataset_type.txt").write_text(dataset_type + "\n")
    (root / split / "nshards.txt").write_text(f"{len(shards)}\n")
    for index, members in enumerate(shards):
        write_tar(root / split / f"{index}.tar", members)
    return root


def read_all(eval_set, parts=None) -> list:
    return [sample for part in (parts or eval_set.parts) for block in read_part(eval_set, part) for sample in block]


def test_clip_benchmark_set_is_found_from_its_root_and_from_a_split_folder(tmp_path):
    root = clip_benchmark_set(tmp_path / "cifar10", [labelled("a", 0) + labelled("b", 1), labelled("c", 1)],
                              templates=["a photo of a {c}.", "a blurry photo of a {c}."])
    clip_benchmark_set(root, [labelled("t", 0)], split="train")
    from_root = open_eval_set(str(root))
    from_split = open_eval_set(str(root / "test"))
    for found in (from_root, from_split):
        assert (found.layout, found.kind, found.split) == ("clip_benchmark", "classification", "test")
        assert found.url == str(root / "test")
        assert [part.url for part in found.parts] == [str(root / "test" / "0.tar"), str(root / "test" / "1.tar")]
        assert found.class_names == ["cat", "dog"]
        assert found.classnames_url == str(root / "classnames.txt")
        assert found.templates == ["a photo of a {}.", "a blurry photo of a {}."]  # CLIP_benchmark's {c} read as {}
    assert (from_root.name, from_split.name) == ("cifar10", "cifar10-test")
    assert open_eval_set(str(root / "train")).split == "train"
    assert open_eval_set(str(root), split="train").url == str(root / "train")
    samples = read_all(from_root)
    assert [(s.key, s.label, s.error) for s in samples] == [("a", 0, ""), ("b", 1, ""), ("c", 1, "")]
    assert all(s.image == png() for s in samples)
    assert len({s.sample_id for s in samples}) == 3


def test_a_set_without_templates_gets_the_papers_imagenet_templates(tmp_path):
    root = clip_benchmark_set(tmp_path / "set", [labelled("a", 0)])
    assert open_eval_set(str(root)).templates == list(IMAGENET_TEMPLATES)


def test_a_template_without_a_slot_names_the_file(tmp_path):
    root = clip_benchmark_set(tmp_path / "set", [labelled("a", 0)], templates=["a photo of a {c}.", "no slot"])
    with pytest.raises(EvalSetError, match="zeroshot_classification_templates.txt: template 'no slot'"):
        open_eval_set(str(root))


def test_missing_classnames_names_that_file(tmp_path):
    root = clip_benchmark_set(tmp_path / "set", [labelled("a", 0)], classnames=None)
    with pytest.raises(EvalSetError) as error:
        open_eval_set(str(root))
    assert str(root / "classnames.txt") in str(error.value)
    assert "no class names" in str(error.value)


def test_a_missing_split_names_its_nshards_file_and_the_splits_there(tmp_path):
    root = clip_benchmark_set(tmp_path / "set", [labelled("a", 0)])
    with pytest.raises(EvalSetError) as error:
        open_eval_set(str(root), split="val")
    assert str(root / "val" / "nshards.txt") in str(error.value)
    assert "splits here: test" in str(error.value)


def test_multilabel_sets_are_refused_naming_dataset_type(tmp_path):
    root = clip_benchmark_set(tmp_path / "set", [labelled("a", 0)], dataset_type="multilabel")
    with pytest.raises(EvalSetError, match="dataset_type.txt: multilabel"):
        open_eval_set(str(root))


def test_a_class_index_out_of_range_names_the_shard_and_the_key_when_read(tmp_path):
    root = clip_benchmark_set(tmp_path / "set", [labelled("a", 0) + labelled("far", 2)])
    eval_set = open_eval_set(str(root))  # opening reads no shard
    with pytest.raises(EvalSetError) as error:
        read_all(eval_set)
    message = str(error.value)
    assert str(root / "test" / "0.tar") in message and "'far'" in message
    assert "class index 2" in message and "valid: 0..1" in message


def test_samples_without_a_label_or_an_image_are_counted_not_dropped(tmp_path):
    members = (labelled("good", 1)
               + [("nolabel.png", png())]
               + [("noimage.cls", b"0")]
               + [("badlabel.png", png()), ("badlabel.cls", b"dog")])
    eval_set = open_eval_set(str(clip_benchmark_set(tmp_path / "set", [members])))
    samples = read_all(eval_set)
    assert [s.key for s in samples] == ["good", "nolabel", "noimage", "badlabel"]
    assert Counter(s.error for s in samples if s.error) == {"missing_label": 2, "missing_image": 1}
    good = [s for s in samples if not s.error]
    assert [(s.key, s.label) for s in good] == [("good", 1)]
    assert all(not s.image for s in samples if s.error)


def test_a_retrieval_set_gives_every_caption_of_an_image(tmp_path):
    members = [("x.jpg", png(1)), ("x.txt", b"a dog on a beach\n\nthe dog runs  \na wet dog\n"),
               ("y.webp", png(2)), ("y.txt", b"one caption"),
               ("z.png", png(3))]
    root = clip_benchmark_set(tmp_path / "flickr", [members], classnames=None, dataset_type="retrieval")
    eval_set = open_eval_set(str(root))
    assert (eval_set.kind, eval_set.class_names) == ("retrieval", [])
    assert for_task(eval_set, "retrieval") is eval_set
    samples = read_all(eval_set)
    assert [(s.key, s.captions, s.error) for s in samples] == [
        ("x", ("a dog on a beach", "the dog runs", "a wet dog"), ""),
        ("y", ("one caption",), ""),
        ("z", (), "missing_caption"),
    ]
    assert samples[0].image == png(1)


WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def image_folder(root: Path, classes: list[str], per_class: int = 2, split: str = "val") -> Path:
    """ImageNet's layout: ``<root>/<split>/<class folder>/<image>``."""
    for index, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True)
        for image in range(per_class):
            (folder / f"img{image}.JPEG").write_bytes(png(10 * index + image))
        (folder / "notes.txt").write_text("not an image")
    return root


def test_an_image_folder_from_a_split_folder_with_wordnet_ids_gets_imagenets_names(tmp_path):
    root = image_folder(tmp_path / "imagenet", sorted(WNIDS, reverse=True))  # folder order is sorted order
    eval_set = open_eval_set(str(root / "val"))
    assert (eval_set.layout, eval_set.kind, eval_set.split, eval_set.name) == (
        "image_folder", "classification", "val", "imagenet-val")
    assert eval_set.class_names == ["tench", "goldfish", "great white shark"]
    assert "imagenet_classes.tsv" in eval_set.classnames_url
    assert eval_set.samples == 6 and eval_set.templates == list(IMAGENET_TEMPLATES)
    samples = read_all(eval_set)
    assert [(s.key, s.label) for s in samples] == [(f"img{i}.JPEG", label) for label in range(3) for i in range(2)]
    assert samples[0].image == png(20)  # n01440764 was written third


def test_an_image_folder_root_opens_the_split_asked_for(tmp_path):
    root = image_folder(tmp_path / "imagenet", list(WNIDS))
    image_folder(root, list(WNIDS), per_class=1, split="train")
    assert open_eval_set(str(root), split="val").samples == 6
    train = open_eval_set(str(root), split="train")
    assert (train.split, train.url, train.samples) == ("train", str(root / "train"), 3)
    with pytest.raises(EvalSetError, match="no class folders with images"):
        open_eval_set(str(root))  # no test/ here


def test_image_folder_class_names_from_classnames_txt_then_folder_names(tmp_path):
    named = image_folder(tmp_path / "named", list(WNIDS))
    (named / "classnames.txt").write_text("fish one\nfish two\nshark\n")
    found = open_eval_set(str(named), split="val")
    assert found.class_names == ["fish one", "fish two", "shark"]
    assert found.classnames_url == str(named / "classnames.txt")
    plain = open_eval_set(str(image_folder(tmp_path / "pets", ["tabby_cat", "golden_retriever"]) / "val"))
    assert plain.class_names == ["golden retriever", "tabby cat"]
    assert plain.classnames_url == f"the folder names of {tmp_path / 'pets' / 'val'}"
    override = tmp_path / "names.txt"
    override.write_text("dog\ncat\n")
    assert open_eval_set(str(tmp_path / "pets" / "val"), classnames=str(override)).class_names == ["dog", "cat"]


def test_a_class_count_mismatch_names_the_file_and_both_counts(tmp_path):
    root = image_folder(tmp_path / "imagenet", list(WNIDS))
    (root / "val" / "classnames.txt").write_text("tench\ngoldfish\n")
    with pytest.raises(EvalSetError) as error:
        open_eval_set(str(root / "val"))
    message = str(error.value)
    assert message.startswith(str(root / "val" / "classnames.txt"))
    assert "2 class names for the 3 class folders" in message


def rayclip_shards(folder: Path, samples: list[tuple[str, int | None]], extra: dict, per_shard: int = 2) -> None:
    """Shards as ``prepare_data.py`` writes them: ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json`` (the label), a manifest."""
    entries = []
    for index, start in enumerate(range(0, len(samples), per_shard)):
        members = []
        for key, label in samples[start:start + per_shard]:
            meta = {"key": key, **({"label": label} if label is not None else {})}
            members += [(f"{key}.jpg", png(3)), (f"{key}.txt", f"a photo of {key}".encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
        write_tar(folder / f"{index:05d}.tar", members)
        entries.append(ShardEntry(f"{index:05d}.tar", len(samples[start:start + per_shard])))
    write_manifest(storage.resolve(str(folder / MANIFEST_NAME)), Manifest(entries, extra=extra))


def test_rayclip_shards_test_split_is_heldout_with_its_template(tmp_path):
    root = tmp_path / "fashion"
    names = ["t-shirt", "trouser", "bag"]
    rayclip_shards(root, [("t0", 0), ("t1", 1), ("t2", 2)],
                   {"class_names": names, "templates": ["a {}."], "heldout_template": "a photo of a {}."})
    rayclip_shards(root / "heldout", [("h0", 2), ("h1", 0), ("h2", 1)],
                   {"class_names": names, "template": "a photo of a {}."})
    heldout = open_eval_set(str(root))
    assert (heldout.layout, heldout.kind, heldout.split, heldout.samples) == ("rayclip", "classification", "test", 3)
    assert heldout.url == str(root / "heldout") and heldout.class_names == names
    assert heldout.templates == ["a photo of a {}."]
    assert [part.samples for part in heldout.parts] == [2, 1]
    assert [(s.key, s.label) for s in read_all(heldout)] == [("h0", 2), ("h1", 0), ("h2", 1)]
    train = open_eval_set(str(root), split="train")
    assert (train.url, train.samples, train.templates) == (str(root), 3, list(IMAGENET_TEMPLATES))
    as_retrieval = for_task(heldout, "retrieval")  # captioned shards: each image with its one caption
    assert as_retrieval.kind == "retrieval" and heldout.kind == "classification"
    assert [s.captions for s in read_all(as_retrieval)][0] == ("a photo of h0",)
    with pytest.raises(EvalSetError, match="splits 'test' \\(heldout/\\) and 'train', not 'dev'"):
        open_eval_set(str(root), split="dev")


def test_rayclip_shards_without_class_names_are_a_caption_set(tmp_path):
    rayclip_shards(tmp_path / "captions", [("a", None), ("b", None)], {"source": "folder"})
    found = open_eval_set(str(tmp_path / "captions"))
    assert found.kind == "retrieval"
    with pytest.raises(EvalSetError, match="allowed: task 'retrieval'"):
        for_task(found, "zeroshot")


def test_for_task_names_what_the_set_cannot_do(tmp_path):
    folder = open_eval_set(str(image_folder(tmp_path / "imagenet", list(WNIDS)) / "val"))
    assert for_task(folder, "zeroshot") is folder and for_task(folder, "linear-probe") is folder
    with pytest.raises(EvalSetError) as error:
        for_task(folder, "retrieval")
    assert folder.url in str(error.value) and "image_folder classification set has no captions" in str(error.value)
    captions = open_eval_set(str(clip_benchmark_set(tmp_path / "coco", [[("x.png", png()), ("x.txt", b"c")]],
                                                    classnames=None, dataset_type="retrieval")))
    for task in ("zeroshot", "linear-probe"):
        with pytest.raises(EvalSetError, match=f"cannot be evaluated with task '{task}'"):
            for_task(captions, task)


def test_limit_set_cuts_tar_parts_without_counts_exactly_in_part_order(tmp_path):
    shards = [sum((labelled(f"s{shard}-{i}", 1) for i in range(size)), []) for shard, size in enumerate((3, 2, 4))]
    eval_set = open_eval_set(str(clip_benchmark_set(tmp_path / "set", shards)))
    keys = [s.key for s in read_all(eval_set)]
    assert len(keys) == 9
    for max_images in (1, 3, 4, 5, 8, 9):
        cut = limit_set(eval_set, max_images)
        assert cut.samples == max_images
        assert [s.key for s in read_all(cut)] == keys[:max_images], max_images
    assert [(p.index, p.limit) for p in limit_set(eval_set, 4).parts] == [(0, None), (1, 1)]
    assert [(p.index, p.limit) for p in limit_set(eval_set, 3).parts] == [(0, None)]
    everything = limit_set(eval_set, 100)
    assert everything.samples == 9 and [p.limit for p in everything.parts] == [None, None, None]
    assert limit_set(eval_set, None) is eval_set


def test_limit_set_uses_recorded_counts_without_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(sets_module, "FILES_PER_PART", 2)
    folder = open_eval_set(str(image_folder(tmp_path / "imagenet", list(WNIDS)) / "val"))
    assert [len(p.files) for p in folder.parts] == [2, 2, 2]
    cut = limit_set(folder, 3)
    assert [(len(p.files), p.limit) for p in cut.parts] == [(2, None), (2, 1)]
    assert [s.key for s in read_all(cut)] == [s.key for s in read_all(folder)][:3]

    root = tmp_path / "fashion"
    rayclip_shards(root / "heldout", [(f"h{i}", 0) for i in range(5)], {"class_names": ["a"], "template": "{}"})
    shards = open_eval_set(str(root / "heldout"))
    (root / "heldout" / "00002.tar").unlink()  # counts come from the manifest: the last shard is never opened
    cut = limit_set(shards, 3)
    assert [(p.samples, p.limit) for p in cut.parts] == [(2, None), (2, 1)]
    assert [s.key for s in read_all(cut)] == ["h0", "h1", "h2"]


def test_layout_detection_names_an_empty_or_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalSetError) as error:
        open_eval_set(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(error.value) and "not an evaluation set" in str(error.value)
    with pytest.raises(EvalSetError, match="no such folder"):
        open_eval_set(str(tmp_path / "absent"))
    with pytest.raises(EvalSetError, match="layout 'coco' is not one of auto, clip_benchmark, image_folder, rayclip"):
        open_eval_set(str(tmp_path / "empty"), layout="coco")
