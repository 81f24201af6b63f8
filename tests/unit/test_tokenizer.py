"""The CLIP tokenizer gives OpenAI's ids exactly: OpenAI's own SimpleTokenizer is the reference.

OpenAI's ``clip/simple_tokenizer.py`` (openai-clip 1.0.1) is loaded by file path (``import clip`` needs
pkg_resources); ``openai_tokenize`` below is ``clip.tokenize(texts, truncate=True)`` with int64 output.
open_clip's tokenizer is a second reference where it agrees with OpenAI's (it spells the special tokens
differently, so not on texts that contain them).
"""

from __future__ import annotations

import functools
import gzip
import pickle
import random
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.tokenizer import (
    BPE_VOCAB_PATH,
    CLIPTokenizer,
    bytes_to_unicode,
    get_tokenizer,
    openai_clean,
)
from models.zero_shot import IMAGENET_TEMPLATES
from tests.reference import openai_clip_module


@functools.cache
def openai_tokenizer():
    return openai_clip_module("simple_tokenizer").SimpleTokenizer()


def openai_ids(text: str, context_length: int = 77) -> list[int]:
    """OpenAI's row for one text: [SOT] + ids + [EOT], cut to context_length with [EOT] kept last, zero-padded."""
    ref = openai_tokenizer()
    sot, eot = ref.encoder["<|startoftext|>"], ref.encoder["<|endoftext|>"]
    tokens = [sot, *ref.encode(text), eot]
    if len(tokens) > context_length:
        tokens = tokens[:context_length]
        tokens[-1] = eot
    return tokens + [0] * (context_length - len(tokens))


def openai_tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    return torch.tensor([openai_ids(t, context_length) for t in texts], dtype=torch.long).reshape(-1, context_length)


def assert_same_as_openai(texts: list[str], context_length: int = 77) -> None:
    """Batch, one-by-one and untruncated ``encode`` all equal OpenAI's; names the first differing texts."""
    tok = get_tokenizer(context_length)
    got, expected = tok(texts), openai_tokenize(texts, context_length)
    assert got.dtype == torch.int64 and got.shape == expected.shape
    differing = [t for t, a, b in zip(texts, got, expected) if not torch.equal(a, b)]
    assert not differing, f"{len(differing)} of {len(texts)} differ from OpenAI in a batch, e.g. {differing[:3]!r}"
    differing = [t for t in texts if tok(t)[0].tolist() != openai_ids(t, context_length)]
    assert not differing, f"texts differ from OpenAI when alone: {differing[:3]!r}"
    differing = [t for t in texts if tok.encode(t) != openai_tokenizer().encode(t)]
    assert not differing, f"encode() differs from OpenAI's: {differing[:3]!r}"


def imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


TRICKY = {
    "html entities": [
        "Tom &amp; Jerry", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;lt; twice", "fish &amp chips", "&#39;quoted&#39;",
        "&#x345;&#837;", "&nbsp;spaced&nbsp;", "&#0;&#x0;&amp;#0;nul", "AT&T",
    ],
    "mojibake": [
        "CafÃ© au lait", "â€œquotedâ€\x9d", "sÃ³", "voilÃ le travail", "Ã  la carte", "ÐŸÑ€Ð¸Ð²ÐµÑ‚",
        "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t have eyebrows.", "âœ” No problems", "Ã\xa0 bientÃ´t",
        "1\nÃ b", "é\nÂ b",
    ],
    "curly quotes": ["“Hello,” she said. ‘It’s fine’", "„Gänsefüßchen“ and «guillemets»", "it’s Bob’s"],
    "emoji": ["dog 🐶 on a 🏖️ beach", "family 👨‍👩‍👧 flag 🇫🇷 thumbs 👍🏽", "🙂🙂🙂", "✨new✨"],
    "CJK": ["一只猫在桌子上。", "東京タワー、夜景！", "고양이 사진", "ｶﾀｶﾅ ＬＯＵＤ　ＮＯＩＳＥＳ"],
    "RTL and Indic": ["قطة على الطاولة", "חתול על השולחן", "แมวบนโต๊ะ", "मेज़ पर बिल्ली", "٣ أقلام"],
    "combining marks": ["cafe\u0301 decomposed", "a\u0300\u0301\u0302 stacked", "Z̴̧̛a̷l̸g̵o̶", "\u0301 leading"],
    "U+0345": ["\u0345", "ι\u0345", "α\u0345β", "ᾳ ᾼ", "ΑΙ\u0345", "x\u0345y", "'\u0345s"],
    "newer Unicode": [
        "\ua7ce\ua7cf\ua7d2", "x\u0c5cy\u0cdc", "\U00010940\U00010941", "\U00011de0\U00011de1 7", "\u088f letter",
        "\U0001fae9 emoji 16",
    ],
    "control characters": [
        "null\x00byte", "bell\x07", "esc \x1b[31mred\x1b[0m text", "del\x7f", "\x1c\x1d\x1e\x1f seps",
        "\x0b\x0c vt ff", "c1 \x85 \x93q\x94", "\x81\x8d\x8f\x90\x9d", "tab\tseparated",
    ],
    "whitespace": [
        "", "   ", " \t\n\r ", "\u3000\u2028\u2029\xa0\u2003", "line1\r\nline2\rline3\nline4",
        "  leading and trailing  ", "nbsp\xa0é\u202fthin",
    ],
    "special tokens": [
        "<|endoftext|>", "a <|endoftext|> b", "<<|endoftext|>", "<|startoftext|>hello<|endoftext|>", "<|ENDOFTEXT|>",
        "<|endoftext|", "x<|endoftext|>y", "<|endoftext|><|endoftext|>", "&lt;|endoftext|&gt;", "<|startoftext|>",
    ],
    "contractions and case folding": [
        "It's Bob's; they've, I'm, we'll, he'd 're 'T", "'ſ long s", "'S'T'RE'VE", "'K", "don't", "ΟΔΟΣ ΟΔΟΣ.",
        "İstanbul", "STRASSE Straße ẞ", "ǅungla ǈ ǋ", "ﬂubberiﬁc ﬀ ﬆ", "'ﬆ'ß",
    ],
    "digits and symbols": [
        "1234567890 ½ ² 𝟙 Ⅻ", "#hashtag @user https://example.com/a?b=c&d=e", "C++ & C#", "5'11\" tall",
        "$9.99 €5 ¥100", "e=mc² ∑∫√∞",
    ],
    "invisible": [
        "zero\u200bwidth", "\ufeffbom", "soft\xadhyphen", "rtl\u202eoverride", "\u2066isolate\u2069",
        "\U000e0041\U000e007f tag chars",
    ],
    "surrogates, noncharacters": ["\ud83d\ude00 pair", "lone \ud800 surrogate", "\udfff", "\uffff\ufffe\U0010ffff"],
}


@pytest.mark.parametrize("texts", list(TRICKY.values()), ids=list(TRICKY))
def test_tricky_captions_match_openai(texts):
    assert_same_as_openai(texts)


def test_all_tricky_captions_in_one_batch():
    assert_same_as_openai([t for texts in TRICKY.values() for t in texts])


def test_known_ids():
    tok = get_tokenizer()
    assert tok("a diagram")[0, :5].tolist() == [49406, 320, 22697, 49407, 0]
    assert tok(["a dog"])[0, :5].tolist() == [49406, 320, 1929, 49407, 0]


def test_vocabulary_is_openais():
    tok, ref = get_tokenizer(), openai_tokenizer()
    assert bytes_to_unicode() == openai_clip_module("simple_tokenizer").bytes_to_unicode()
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id, tok.context_length) == (49408, 49406, 49407, 77)
    assert len(ref.encoder) == tok.vocab_size
    assert all(tok.decode([i], skip_special_tokens=False) == ref.decode([i]) for i in range(tok.vocab_size))


def test_imagenet_templates_match_openai_and_open_clip():
    import open_clip

    texts = [t.format(c) for c in imagenet_classnames()[::10] for t in IMAGENET_TEMPLATES]
    assert_same_as_openai(texts)
    assert torch.equal(get_tokenizer()(texts), open_clip.get_tokenizer("ViT-B-32")(texts))


def test_captions_match_open_clip():
    import open_clip

    texts = [t for texts in TRICKY.values() for t in texts if "<" not in t and "&lt;" not in t]
    assert torch.equal(get_tokenizer()(texts), open_clip.tokenizer.SimpleTokenizer()(texts))


@pytest.mark.parametrize("context_length", [2, 3, 16, 77])
def test_truncation_keeps_eot_last(context_length):
    texts = ["a " * 200, "supercalifragilistic" * 50, "!" * 300, "x", "", "one two three four five six"]
    texts += [" ".join(["dog"] * n) for n in range(context_length - 3, context_length + 2) if n >= 0]
    assert_same_as_openai(texts, context_length)
    rows = get_tokenizer(context_length)(texts)
    assert (rows[:, 0] == 49406).all() and rows[0, -1] == 49407


def random_unicode_text(rng: random.Random) -> str:
    """Text mixing ASCII words, Latin-1, every BMP and astral code point (surrogates too) and tricky pieces."""
    pieces = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.3:
            pieces.append("".join(rng.choices(ASCII_PIECE, k=rng.randint(1, 8))))
        elif kind < 0.45:
            pieces.append(chr(rng.randint(0x80, 0x2FF)))
        elif kind < 0.7:
            pieces.append(chr(rng.randint(0x300, 0xFFFF)))
        elif kind < 0.85:
            pieces.append(chr(rng.randint(0x10000, 0x10FFFF)))
        elif kind < 0.9:
            pieces.append(rng.choice(["\t", "\n", "\r\n", " ", "\xa0", "\u3000", "\x00", "\x1b", "\x85", "\u2028"]))
        else:
            pieces.append(rng.choice(SPECIAL_PIECES))
        if rng.random() < 0.5:
            pieces.append(" ")
    return "".join(pieces)


ASCII_PIECE = "abcdefghijklmnopqrstuvwxyzABCXYZ'&;. ,!?0123456789"
SPECIAL_PIECES = [
    "<|endoftext|>", "<|startoftext|>", "&amp;", "&lt;|", "'s", "'ſ", "\u0345", "Ã©", "â€™", "’", "“", "ﬁ", "Ａ",
    "e\u0301", "Σ", "İ", "ß",
]


def test_random_unicode_matches_openai():
    rng = random.Random(1234)
    assert_same_as_openai([random_unicode_text(rng) for _ in range(1500)])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(st.characters(exclude_categories=()), max_size=30), min_size=1, max_size=8))
def test_any_unicode_matches_openai(texts):
    tok = get_tokenizer()
    assert tok(texts).tolist() == [openai_ids(t) for t in texts]


NEAR_FTFY = st.characters(exclude_categories=()) | st.sampled_from(
    list("&<>;#'\"’‘“”„ʼŉǅĳÃÂâ€œ\x80\x85\x93\x9d\xa0éΣΟ\u0301\u0345ﬁﬆＡｶ")
    + list("\u3000\u2028\u2029\r\n\t\x00\x1b\x1c\x7f\ufeff\u200b")
)


@settings(max_examples=3000, deadline=None)
@given(st.text(NEAR_FTFY, max_size=20))
def test_fast_cleaning_is_openais_cleaning(text):
    fast = get_tokenizer()._fast_clean(text)
    if fast is not None:
        assert " ".join(fast.split()) == openai_clean(text)


def test_only_ampersands_before_letters_digits_or_hash_start_entities():
    import html.entities

    from ftfy.chardata import HTML_ENTITY_RE

    assert all(name[0].isascii() and name[0].isalpha() for name in html.entities.html5)
    assert HTML_ENTITY_RE.pattern.startswith("&#?[0-9A-Za-z]")
    assert_same_as_openai(["a & b", "a &. b", "&!", "fish&chips", "&&amp;", "&é", "&#", "&#;", "&;", "a &"])


def test_cleaning_never_yields_the_caption_separator():
    assert "\x00" not in openai_clean("\x00 &#0; &#x0; &amp;#0; &#x00000;")


def test_output_type_and_shape():
    tok = get_tokenizer()
    assert tok("a dog").shape == (1, 77) and tok("a dog").dtype == torch.int64
    assert tok(["a", "b", "c"]).shape == (3, 77)
    assert tok(("a", "b")).shape == (2, 77)
    assert tok([]).shape == (0, 77)
    assert get_tokenizer(16)(["a dog"]).shape == (1, 16)
    with pytest.raises(TypeError):
        tok(["a dog", 3])
    with pytest.raises(ValueError, match="context_length"):
        CLIPTokenizer(1)


def test_get_tokenizer_is_cached_per_context_length():
    assert get_tokenizer() is get_tokenizer(77) is get_tokenizer(context_length=77)
    assert get_tokenizer(16) is not get_tokenizer(77) and get_tokenizer(16).context_length == 16


def test_vocabulary_checksum_mismatch_raises(tmp_path):
    lines = gzip.decompress(BPE_VOCAB_PATH.read_bytes()).decode("utf-8").split("\n")
    lines[1] = "i m"  # one merge swapped
    tampered = tmp_path / "bpe.txt.gz"
    tampered.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))
    with pytest.raises(ValueError, match="sha256"):
        CLIPTokenizer(bpe_path=tampered)


def test_decode_matches_openai():
    tok, ref = get_tokenizer(), openai_tokenizer()
    for text in ["A photo of a dog.", "“Café” 🐶 東京", "it's <|endoftext|> fine"]:
        assert tok.decode(tok(text)[0]) == ref.decode(ref.encode(text))
    assert tok.decode(tok("a dog")[0], skip_special_tokens=False).startswith("<|startoftext|>a dog <|endoftext|>")


def test_small_caches_and_threads_give_the_same_ids():
    rng = random.Random(7)
    batches = [[random_unicode_text(rng) for _ in range(50)] for _ in range(8)]
    expected = [get_tokenizer()(b) for b in batches]
    tok = CLIPTokenizer(cache_size=16)
    results = [None] * len(batches)

    def work(i):
        for _ in range(3):
            results[i] = tok(batches[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_pickles_by_rebuilding():
    tok = CLIPTokenizer(context_length=20, cache_size=100)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.context_length == 20 and torch.equal(clone(["a dog", "Ünïcödé"]), tok(["a dog", "Ünïcödé"]))


def test_common_captions_skip_ftfy():
    """Only texts that ftfy could change in more than per-character fixes pay for it."""
    tok = get_tokenizer()
    fast = ["a dog", "Tom & Jerry", "一只猫在桌子上。", "café crème", "dog 🐶", "Привет", "“quoted” it’s", "ﬁne", "e\u0301"]
    assert [" ".join(tok._fast_clean(t).split()) for t in fast] == [openai_clean(t) for t in fast]
    slow = ["Tom &amp; Jerry", "AT&T", "CafÃ©", "a\r\nb", "x\ny é", "\x93quoted\x94", "esc\x1b[0m"]
    assert [tok._fast_clean(t) for t in slow] == [None] * len(slow)


MOJIBAKE_ALPHABET = st.characters(min_codepoint=0x20, max_codepoint=0x2FF) | st.sampled_from(
    list("ÃÂÎÐØÙВГРСΒΓΞΟà€œŠš¢£Ÿž\xa0\xad®©°·»–—´×²³√±∂†≠™≤≥¥µø≈‚Ä¬ƒ˜ā‘’“”„…•│┌═ ")
)


def test_needed_characters_are_read_from_the_pattern():
    import re

    from models.tokenizer import _needed_chars_and_width

    assert _needed_chars_and_width(re.compile("[éè]b|xü")) == ({"é", "è", "ü"}, 2)
    for unsupported in ["é|a", "é(?=x)", "é$", "éb+", "(é)\\1"]:
        assert _needed_chars_and_width(re.compile(unsupported)) is None, unsupported


@settings(max_examples=3000, deadline=None)
@given(st.text(MOJIBAKE_ALPHABET, max_size=24))
def test_windowed_mojibake_test_equals_ftfy(text):
    from ftfy.badness import is_bad

    assert get_tokenizer()._looks_like_mojibake(text) == is_bad(text)


def test_without_the_per_character_scan_ftfy_runs_on_all_but_plain_ascii(monkeypatch):
    import models.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "_chars_changed_by", lambda fix, text: None)
    tokenizer_module._ftfy_shortcut.cache_clear()
    try:
        tok = CLIPTokenizer()
        texts = [t for texts in TRICKY.values() for t in texts]
        assert torch.equal(tok(texts), openai_tokenize(texts))
        assert tok._fast_clean("a dog") == "a dog" and tok._fast_clean("café") is None
    finally:
        tokenizer_module._ftfy_shortcut.cache_clear()
