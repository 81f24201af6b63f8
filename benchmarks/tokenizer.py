"""Texts/s of ``models.tokenizer.get_tokenizer()`` against open_clip's tokenizer, on the same texts, same run.

Three text sets: the 80 ImageNet prompt templates x the 1000 ImageNet class names; web-caption-like ASCII
captions; the same captions with ~15% made non-ASCII (accents, curly quotes, dashes, emoji, CJK, Cyrillic,
Arabic, ...). Every timed output is checked id for id against open_clip's.

"warm" is the steady state of a long run: templates tokenized again, captions never seen before but with
both tokenizers' caches warmed on other captions from the same generator. "cold" is the first pass of a
freshly built tokenizer (construction is timed separately). Each figure is the best of --repeats runs.

    python benchmarks/tokenizer.py [--captions 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import time
from itertools import accumulate
from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from models.tokenizer import CLIPTokenizer, get_tokenizer
from models.zero_shot import IMAGENET_TEMPLATES

COMMON_WORDS = (
    "a the of and in on with for at by from to is are photo image picture stock vector illustration view close-up "
    "portrait background white black red blue green yellow old new young beautiful happy big small little man woman "
    "men women people girl boy baby child kids family friends couple team player during match game football city "
    "street road house home room kitchen garden table chair bed window door car bus train bike boat beach sea ocean "
    "lake river mountain forest tree flowers sunset sunrise night day summer winter snow rain sky clouds dog cat "
    "horse bird fish food fresh cake coffee cup wine dinner breakfast dress shirt shoes hat wedding party christmas "
    "holiday vintage modern art painting drawing design logo icon set pattern texture wallpaper hd quality isolated "
    "top side front back near under over between two three four five sale free best top-rated handmade original "
    "it's isn't can't don't women's men's kid's we're they've"
).split()
ZIPF_WEIGHTS = list(accumulate(1 / rank for rank in range(1, len(COMMON_WORDS) + 1)))
NON_ASCII_WORDS = (
    "café naïve São Paulo Zürich crème brûlée piñata Málaga Köln Ελλάδα Москва улица 東京 北京烤鸭 寿司 서울 "
    "मुंबई القاهرة Ærøskøbing façade jalapeño über Ñandú résumé Øresund İstanbul Łódź Ðakovo ℃ ½ × … · ©"
).split()
EMOJI = ["😀", "🐶", "🎉", "❤️", "👍🏽", "🌅", "🇫🇷", "✨", "👨‍👩‍👧"]


def template_texts() -> list[str]:
    return [template.format(name) for name in IMAGENET_CLASSNAMES for template in IMAGENET_TEMPLATES]


def class_name_words() -> list[str]:
    return sorted({w.strip(",.'") for name in IMAGENET_CLASSNAMES for w in name.split()} - {""})


def ascii_caption(rng: random.Random, words: list[str]) -> str:
    """An alt-text-like caption: Zipf-ish common words, class-name words, numbers, casing and punctuation."""
    out = []
    for _ in range(rng.randint(4, 22)):
        r = rng.random()
        if r < 0.6:
            word = rng.choices(COMMON_WORDS, cum_weights=ZIPF_WEIGHTS)[0]
        elif r < 0.9:
            word = rng.choice(words)
        elif r < 0.95:
            word = rng.choice([str(rng.randint(1, 2024)), f"{rng.randint(2, 99)}.{rng.randint(10, 99)}", "4x6"])
        else:
            word = rng.choice(["#nofilter", "@studio", "www.example.com", "&", "(2019)", "-", "|", "4K", "3D"])
        out.append(word.capitalize() if rng.random() < 0.15 else word)
    caption = " ".join(out)
    caption = caption[0].upper() + caption[1:]
    return caption + rng.choice(["", "", ".", "!", " ...", " - stock photo"])


def make_non_ascii(rng: random.Random, caption: str) -> str:
    """The caption with typical web non-ASCII: curly apostrophes/quotes, dashes, foreign words, emoji."""
    words = caption.split()
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if r < 0.25:
            caption = " ".join(words).replace("'", "’")
            words = caption.split()
            if "’" not in caption:
                words.insert(rng.randrange(len(words) + 1), "“" + rng.choice(COMMON_WORDS) + "”")
        elif r < 0.35:
            words.insert(rng.randrange(len(words) + 1), rng.choice(["–", "—"]))
        elif r < 0.75:
            words.insert(rng.randrange(len(words) + 1), rng.choice(NON_ASCII_WORDS))
        else:
            words.append(rng.choice(EMOJI))
    return " ".join(words)


def caption_texts(n: int, seed: int, non_ascii_fraction: float) -> list[str]:
    rng, words = random.Random(seed), class_name_words()
    captions = [ascii_caption(rng, words) for _ in range(n)]
    return [make_non_ascii(rng, c) if rng.random() < non_ascii_fraction else c for c in captions]


def compare(name: str, eval_sets: list[list[str]], warmup: list[str]) -> None:
    """Cold first passes of fresh tokenizers, then warm passes after ``warmup``; best of each; same ids."""
    cold, warm = [float("inf")] * 2, [float("inf")] * 2
    for texts in eval_sets:
        fresh = CLIPTokenizer(), SimpleTokenizer()
        cold = [min(c, t) for c, t in zip(cold, timed_and_checked(fresh, texts, name))]
    ours, theirs = CLIPTokenizer(), SimpleTokenizer()
    ours(warmup), theirs(warmup)
    for texts in eval_sets:
        warm = [min(w, t) for w, t in zip(warm, timed_and_checked((ours, theirs), texts, name))]
    n = len(eval_sets[0])
    print(
        f"{name:<34} {n:>7,} texts | warm: ours {n / warm[0]:>9,.0f}/s  open_clip {n / warm[1]:>7,.0f}/s  "
        f"ratio {warm[1] / warm[0]:5.1f}x | cold: ours {n / cold[0]:>9,.0f}/s  open_clip {n / cold[1]:>7,.0f}/s  "
        f"ratio {cold[1] / cold[0]:5.1f}x"
    )


def timed_and_checked(tokenizers, texts: list[str], name: str) -> list[float]:
    """Seconds each tokenizer takes on ``texts``; asserts that they return the same ids."""
    seconds, outputs = [], []
    for tokenize in tokenizers:
        start = time.perf_counter()
        outputs.append(tokenize(texts))
        seconds.append(time.perf_counter() - start)
    assert all(torch.equal(outputs[0], out) for out in outputs[1:]), f"{name}: ids differ from open_clip's"
    return seconds


def report_construction() -> None:
    start = time.perf_counter()
    get_tokenizer()
    first = time.perf_counter() - start
    start = time.perf_counter()
    CLIPTokenizer()
    again = time.perf_counter() - start
    start = time.perf_counter()
    SimpleTokenizer()
    theirs = time.perf_counter() - start
    print(f"construction: ours {first:.2f} s first (incl. the one-off ftfy character scan), {again:.2f} s after; "
          f"open_clip {theirs:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=10_000, help="captions per timed set")
    parser.add_argument("--repeats", type=int, default=3, help="timed sets (best is reported)")
    args = parser.parse_args()
    report_construction()
    templates = template_texts()
    compare("ImageNet templates (80 x 1000)", [templates] * args.repeats, templates)
    for fraction in (0.0, 0.15):
        sets = [caption_texts(args.captions, seed, fraction) for seed in range(args.repeats + 1)]
        compare(f"web captions, {fraction:.0%} non-ASCII", sets[1:], sets[0])


if __name__ == "__main__":
    main()
