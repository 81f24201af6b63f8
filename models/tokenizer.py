"""CLIP's lower-cased byte-level BPE tokenizer, id-for-id identical to OpenAI's, on Hugging Face ``tokenizers``.

OpenAI's ``SimpleTokenizer`` (clip/simple_tokenizer.py) cleans a caption (``ftfy.fix_text``, HTML unescaped
twice, whitespace collapsed, lower-cased), splits it with one regular expression and runs a pure-Python BPE
over each piece. This module keeps every step's semantics and changes only where the time goes:

* **BPE** runs in Rust (``tokenizers.models.BPE`` built from OpenAI's own vocabulary file), one word at a
  time behind a word cache and a cache of space-separated chunks. A regex match never contains a space and
  the regex restarts at every chunk, so tokenizing chunk by chunk gives the same ids as the whole caption.
* **The split** of a new chunk uses OpenAI's pattern on Python's ``regex`` module, the engine OpenAI uses.
  Splitting in Rust instead (Oniguruma) was slower per caption here and disagrees with ``regex`` on letters
  newer than its Unicode tables and on case folding (U+0345), so it would need a second, reference path.
* **ftfy runs only where its result is not known in advance.** ftfy repeats [HTML unescape, mojibake
  repair, per-character fixers, NFC] until the text stops changing. Which characters the fixers change,
  and to what, is read from ftfy itself once per process; ftfy's mojibake test is run only around the
  characters that every mojibake match needs. A caption with no line break and no ``&`` that could start
  an entity, that does not look like mojibake before or after its per-character fixes, is cleaned without
  calling ftfy (curly quotes, ligatures, full-width forms, NFC included); all others take OpenAI's exact
  cleaning. Plain ASCII batches are lower-cased and split in one call each.
* **Output**: the chunk cache holds packed int64 ids, so a batch is one ``bytes.join`` and a few numpy
  operations into a preallocated array, not row by row.

The vocabulary file is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT, see LICENSE-openai-clip-bpe.txt); its
sha256 is checked on load.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import re
import unicodedata
from array import array
from collections.abc import Callable, Iterable, Sequence
from functools import cache, partial
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import ftfy
import numpy as np
import regex
import torch
from ftfy.badness import BADNESS_RE, is_bad
from tokenizers.models import BPE

BPE_VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
BPE_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # the file's first line is a version header; OpenAI keeps lines 1..48894
DEFAULT_CONTEXT_LENGTH = 77
DEFAULT_CACHE_SIZE = 1 << 18

# OpenAI's split pattern, applied case-insensitively by the `regex` module, exactly as in simple_tokenizer.py.
SPLIT_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE_RUN = regex.compile(r"\s+")
# html.unescape and ftfy's unescape_html change "&..." only where an ASCII letter, digit or "#" follows.
_ENTITY_START = r"&[0-9A-Za-z#]"
_ENTITY_START_RE = re.compile(_ENTITY_START)
_FTFY_SEGMENT_LENGTH = ftfy.TextFixerConfig().max_decode_length
# Joined between captions: NUL is removed by ftfy and never in a caption that skips it, so it is its own chunk.
_END_CHUNK = " \x00 "
_END_CHUNK_KEY = "\x00"
_END_OF_TEXT = -1


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (OpenAI CLIP uses the same)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_values, code_points = printable[:], printable[:]
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + len(code_points) - len(printable))
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def load_bpe_vocabulary(path: str | Path = BPE_VOCAB_PATH) -> tuple[list[str], list[tuple[str, str]]]:
    """Read OpenAI's BPE file and lay out the vocabulary as OpenAI does.

    Ids: the 256 byte symbols, the same with ``</w>``, one id per merge (the pair joined), then
    ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 in all). Raises ``ValueError`` when the file's
    sha256 is not that of OpenAI's file, since any other vocabulary silently yields different ids.
    """
    raw = Path(path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BPE_VOCAB_SHA256:
        raise ValueError(
            f"BPE vocabulary {path} has sha256 {digest}, expected {BPE_VOCAB_SHA256} "
            "(OpenAI's bpe_simple_vocab_16e6.txt.gz); the file is corrupt or a different vocabulary"
        )
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = [*byte_symbols, *(s + "</w>" for s in byte_symbols), *("".join(m) for m in merges), SOT_TOKEN, EOT_TOKEN]
    return vocab, merges


def _all_code_points() -> str:
    """Every Unicode scalar value (surrogates excluded) in one string, built without a Python loop."""
    code_points = np.concatenate([np.arange(0xD800), np.arange(0xE000, 0x110000)]).astype("<u4")
    return code_points.tobytes().decode("utf-32-le")


def _chars_changed_by(fix: Callable[[str], str], text: str) -> set[str] | None:
    """Characters of ``text`` that ``fix`` changes, from one call on all of ``text`` at once.

    Walks input and output in step (numpy compares, doubling windows) and, at each difference, checks that
    the character fixed alone explains it. Returns None where it does not: ``fix`` is not per-character.
    """
    fixed = fix(text)
    a = np.frombuffer(text.encode("utf-32-le"), "<u4")
    b = np.frombuffer(fixed.encode("utf-32-le"), "<u4")
    changed, i, j, window = set(), 0, 0, 64
    while i < len(a):
        n = min(window, len(a) - i, len(b) - j)
        mismatch = np.flatnonzero(a[i : i + n] != b[j : j + n])
        step = int(mismatch[0]) if len(mismatch) else n
        i, j = i + step, j + step
        if step == n and i < len(a) and j < len(b):
            window *= 2
            continue
        if i == len(a):
            break
        char = chr(a[i])
        replacement = fix(char)
        if replacement == char or fixed[j : j + len(replacement)] != replacement:
            return None
        changed.add(char)
        i, j, window = i + 1, j + len(replacement), 64
    return changed if j == len(b) else None


def _char_class(chars: Iterable[str]) -> str:
    """A regex character class (valid for ``re`` and ``regex``) matching exactly ``chars``."""
    ranges: list[list[int]] = []
    for c in sorted(map(ord, chars)):
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "[" + "".join(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges) + "]"


class _FtfyShortcut(NamedTuple):
    """What ftfy does to text made of characters that its per-character fixers handle alone.

    ``unsafe`` matches what the fast path cannot pass through unchanged: characters that ftfy's fixers
    change, whitespace on which ``str.split`` and regex ``\\s`` disagree, surrogates, and an ``&`` that
    could start an HTML entity. ``maybe_unsafe`` is the same characters plus every ``&`` (a plain set
    searches twice as fast). ``fixes`` maps the non-ASCII characters that exactly one fixer changes, in
    one step, to their replacement (curly quotes, ligatures, full-width forms, ...); ``untranslatable``
    is ``unsafe`` without them and ``translatable`` finds them.
    """

    unsafe: re.Pattern[str]
    maybe_unsafe: re.Pattern[str]
    untranslatable: re.Pattern[str]
    translatable: re.Pattern[str]
    fixes: dict[str, str]


@cache
def _ftfy_shortcut() -> _FtfyShortcut:
    """Find, with ftfy itself, which characters its fixers change and how (once per process, ~0.3 s)."""
    everything = _all_code_points()
    char_fixers = partial(ftfy.fix_text, unescape_html=False, fix_encoding=False, normalization=None)
    changed = _chars_changed_by(char_fixers, everything)
    if changed is None:  # an ftfy whose fixers are not per-character: skip it for tab, newline, printable ASCII only
        changed, fixes = set(everything) - {chr(c) for c in range(0x20, 0x7F)} - {"\t", "\n"}, {}
    else:
        fixes = _one_step_fixes(changed - set(map(chr, range(0x80))))
    whitespace_disagreement = set(re.findall(r"\s", everything)) ^ set(regex.findall(r"\s", everything))
    unsafe = changed | whitespace_disagreement
    surrogates = "\\ud800-\\udfff"
    return _FtfyShortcut(
        unsafe=re.compile(f"{_char_class(unsafe)[:-1]}{surrogates}]|{_ENTITY_START}"),
        maybe_unsafe=re.compile(f"{_char_class(unsafe)[:-1]}{surrogates}&]"),
        untranslatable=re.compile(f"{_char_class(unsafe - fixes.keys())[:-1]}{surrogates}]|{_ENTITY_START}"),
        translatable=re.compile(_char_class(fixes)) if fixes else re.compile("(?!)"),
        fixes=fixes,
    )


def _one_step_fixes(chars: Iterable[str]) -> dict[str, str]:
    """Replacements of the characters that one of ftfy's fixers changes on its own, for good, in one pass."""
    config = ftfy.TextFixerConfig(unescape_html=False, fix_encoding=False, normalization=None, explain=True)
    fixes = {}
    for char in chars:
        fixed, steps = ftfy.fix_and_explain(char, config)
        if steps is not None and len(steps) == 1:  # one fixer changed it in the first pass, none in the second
            fixes[char] = fixed
    return fixes


def _needed_chars_and_width(pattern: re.Pattern[str]) -> tuple[set[str], int] | None:
    """Non-ASCII characters of which every match of ``pattern`` holds one, and its longest match.

    Read from the parsed pattern: each top-level alternative must have a literal or a plain set of
    non-ASCII characters among its mandatory items (the smallest is taken), and nothing may look outside
    the match but a start-of-text anchor. None where that is not so.
    """
    try:
        from re import _constants as sre  # CPython's own regex parser (3.11+)
        from re import _parser
    except ImportError:
        return None

    def non_ascii_set(op, arg) -> set[str]:
        """What a literal or a plain character set matches, if all of it is non-ASCII; else nothing."""
        items = [(op, arg)] if op is sre.LITERAL else arg if op is sre.IN else []
        members: set[int] = set()
        for kind, value in items:
            if kind is sre.LITERAL:
                members.add(value)
            elif kind is sre.RANGE:
                members.update(range(value[0], value[1] + 1))
            else:
                return set()
        return {chr(m) for m in members} if members and min(members) >= 0x80 else set()

    def items(subpattern):
        for op, arg in subpattern:
            yield op, arg
            if op is sre.BRANCH:
                yield from chain.from_iterable(map(items, arg[1]))
            elif op is sre.SUBPATTERN:
                yield from items(arg[3])
            elif op is sre.MAX_REPEAT:
                yield from items(arg[2])

    if pattern.flags & (re.IGNORECASE | re.MULTILINE):
        return None
    tree = _parser.parse(pattern.pattern, pattern.flags)
    plain = {sre.LITERAL, sre.NOT_LITERAL, sre.IN, sre.ANY, sre.BRANCH, sre.SUBPATTERN, sre.MAX_REPEAT}
    if not all(op in plain or (op is sre.AT and arg is sre.AT_BEGINNING) for op, arg in items(tree)):
        return None  # a lookaround, backreference or end anchor could see past a bounded search
    branch = len(tree) == 1 and tree[0][0] is sre.BRANCH
    needed: set[str] = set()
    for alternative in tree[0][1][1] if branch else [tree]:
        options = [s for s in (non_ascii_set(op, arg) for op, arg in alternative) if s]
        if not options:
            return None
        needed |= min(options, key=len)
    width = tree.getwidth()[1]
    return (needed, width) if width < 1000 else None


@cache
def _mojibake_test() -> Callable[[str], bool]:
    """``ftfy.badness.is_bad``, searching only around the characters that every mojibake match needs.

    A match containing such a character at ``i`` lies within ``i - width + 1 .. i + width``, and nothing
    in the pattern looks outside its match (``^`` matches only at a real start), so the answer is the same.
    """
    found = _needed_chars_and_width(BADNESS_RE)
    if found is None:
        return is_bad
    needed, width = found
    hints, search = re.compile(_char_class(needed)).finditer, BADNESS_RE.search

    def looks_like_mojibake(text: str) -> bool:
        return any(search(text, max(0, m.start() - width + 1), m.start() + width) for m in hints(text))

    return looks_like_mojibake


def openai_clean(text: str) -> str:
    """OpenAI's cleaning, step for step: ftfy, HTML unescaped twice, whitespace collapsed, lower-cased."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """Callable CLIP tokenizer: ``tok(texts) -> LongTensor[B, context_length]`` with OpenAI's ids.

    Each row is ``[SOT] + BPE ids + [EOT]`` zero-padded; a longer caption keeps its first
    ``context_length - 1`` tokens and ends in [EOT] (OpenAI's ``truncate=True`` rule). Chunk and word
    caches grow to ``cache_size`` entries each, then start over. Safe to call from several threads.
    """

    def __init__(
        self,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        *,
        bpe_path: str | Path = BPE_VOCAB_PATH,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 ([SOT] and [EOT]), got {context_length!r}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.context_length = context_length
        self._bpe_path = bpe_path
        self._cache_size = cache_size
        vocab, merges = load_bpe_vocabulary(bpe_path)
        self._id_to_token = vocab
        self._encoder = {token: i for i, token in enumerate(vocab)}
        self._bpe = BPE(vocab=self._encoder, merges=merges, end_of_word_suffix="</w>")
        self.vocab_size = len(vocab)
        self.sot_token_id = self._encoder[SOT_TOKEN]
        self.eot_token_id = self._encoder[EOT_TOKEN]
        byte_encoder = bytes_to_unicode()
        self._latin1_to_symbol = str.maketrans({chr(b): s for b, s in byte_encoder.items()})
        self._byte_decoder = {s: b for b, s in byte_encoder.items()}
        self._ftfy = _ftfy_shortcut()
        self._looks_like_mojibake = _mojibake_test()
        self._special_ids = {SOT_TOKEN: self.sot_token_id, EOT_TOKEN: self.eot_token_id}
        self._word_cache: dict[str, bytes] = {}
        self._chunk_cache: dict[str, bytes] = {_END_CHUNK_KEY: _packed([_END_OF_TEXT])}

    def __reduce__(self):
        # Rebuild from the file on unpickling (e.g. in a Ray worker) instead of shipping the Rust model and caches.
        return partial(CLIPTokenizer, bpe_path=self._bpe_path, cache_size=self._cache_size), (self.context_length,)

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """Tokenize one caption or a list of captions into a ``(B, context_length)`` int64 tensor."""
        if isinstance(texts, str):
            texts = [texts]
        return torch.from_numpy(self._pack(self._flat_ids(texts)))

    def encode(self, text: str) -> list[int]:
        """BPE ids of one caption without [SOT]/[EOT] or truncation, as OpenAI's ``SimpleTokenizer.encode``."""
        return self._flat_ids([text])[:-1].tolist()

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a row of ids, as OpenAI's ``SimpleTokenizer.decode`` (words end in a space).

        With ``skip_special_tokens`` a leading [SOT] is dropped and decoding stops at the last [EOT], so
        the padding of a tokenized row is ignored (an [EOT] written in the caption itself is kept).
        """
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if skip_special_tokens:
            if ids and ids[0] == self.sot_token_id:
                ids = ids[1:]
            if self.eot_token_id in ids:
                ids = ids[: len(ids) - 1 - ids[::-1].index(self.eot_token_id)]
        symbols = "".join(self._id_to_token[i] for i in ids)
        data = bytearray(self._byte_decoder[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def _flat_ids(self, texts: Sequence[str]) -> np.ndarray:
        """All captions' BPE ids in one (read-only) int64 array, each caption followed by ``_END_OF_TEXT``.

        The cleaned captions are joined around an end-of-text chunk that no cleaned caption contains and
        split at whitespace in one call; each chunk's ids then come from the chunk cache.
        """
        texts = texts if isinstance(texts, list) else list(texts)
        if not texts:
            return np.empty(0, np.int64)
        plain = " ".join(texts)  # raises TypeError for an item that is not a str
        if plain.isascii() and plain.isprintable() and ("&" not in plain or not _ENTITY_START_RE.search(plain)):
            joined = (_END_CHUNK.join(texts) + _END_CHUNK).lower()  # the common case: one call for the batch
        else:
            joined = _END_CHUNK.join(self._clean_each(texts)) + _END_CHUNK
        return np.frombuffer(self._packed_ids(joined.split()), np.int64)

    def _clean_each(self, texts: list[str]) -> list[str]:
        """Each caption cleaned and lower-cased exactly as OpenAI does, through ftfy only where needed."""
        return [cleaned if (cleaned := self._fast_clean(text)) is not None else openai_clean(text) for text in texts]

    def _fast_clean(self, text: str) -> str | None:
        """``openai_clean(text)`` up to whitespace (split next), where that is provably ftfy's result; else None.

        ftfy repeats [unescape HTML, repair mojibake, per-character fixers, NFC] until nothing changes.
        Without a line break (ftfy works line by line) and an entity-like ``&``, and where its mojibake
        test is negative, the first round gives NFC(text with the per-character fixes); when that holds
        nothing to fix and is not mojibake either, the second round changes nothing and ftfy returns it.
        """
        rules = self._ftfy
        if text.isascii():  # ftfy sees no mojibake in ASCII and changes only control characters there
            clean = text.isprintable() and ("&" not in text or not _ENTITY_START_RE.search(text))
            return text.lower() if clean or not rules.unsafe.search(text) else None
        if "\n" in text or len(text) > _FTFY_SEGMENT_LENGTH:
            return None
        fixed = text
        if rules.maybe_unsafe.search(text) and rules.unsafe.search(text):
            if rules.untranslatable.search(text):
                return None
            fixed = rules.translatable.sub(lambda m: rules.fixes[m.group()], text)
        if not unicodedata.is_normalized("NFC", fixed):
            fixed = unicodedata.normalize("NFC", fixed)
        if self._looks_like_mojibake(text):  # first round: ftfy would try to repair it
            return None
        if fixed != text and (rules.unsafe.search(fixed) or self._looks_like_mojibake(fixed)):  # second round
            return None
        return fixed.lower()

    def _packed_ids(self, chunks: list[str]) -> bytes:
        """The chunks' ids, concatenated, from the chunk cache after adding the chunks it lacks."""
        cache = self._chunk_cache
        try:
            return b"".join(map(cache.get, chunks))
        except TypeError:  # a None: chunks not in the cache yet
            self._encode_new_chunks(set(chunks).difference(cache))
        try:
            return b"".join(map(cache.get, chunks))
        except TypeError:  # the cache filled up and started over meanwhile (or another thread emptied it)
            fresh = self._encode_new_chunks(set(chunks))
            return b"".join(map(fresh.__getitem__, chunks))

    def _encode_new_chunks(self, chunks: set[str]) -> dict[str, bytes]:
        """Ids of new chunks as packed int64 (so a batch's ids are one ``bytes.join``), now also cached."""
        chunks.discard(_END_CHUNK_KEY)  # only seen here if another thread just emptied the cache
        words = {chunk: SPLIT_PATTERN.findall(chunk) for chunk in chunks}
        word_ids = self._word_ids(set(chain.from_iterable(words.values())))
        fresh = {chunk: b"".join(map(word_ids.__getitem__, ws)) for chunk, ws in words.items()}
        _bounded_update(self._chunk_cache, fresh, self._cache_size)
        self._chunk_cache[_END_CHUNK_KEY] = fresh[_END_CHUNK_KEY] = _packed([_END_OF_TEXT])
        return fresh

    def _word_ids(self, words: set[str]) -> dict[str, bytes]:
        cached = {w: ids for w in words if (ids := self._word_cache.get(w)) is not None}
        fresh = {w: _packed(self._bpe_word(w)) for w in words if w not in cached}
        _bounded_update(self._word_cache, fresh, self._cache_size)
        return cached | fresh

    def _bpe_word(self, word: str) -> list[int]:
        if word in self._special_ids:  # the split yields them whole; OpenAI maps them straight to their ids
            return [self._special_ids[word]]
        symbols = word.encode("utf-8").decode("latin-1").translate(self._latin1_to_symbol)
        return [token.id for token in self._bpe.tokenize(symbols)]

    def _pack(self, flat: np.ndarray) -> np.ndarray:
        """``[SOT] + ids[:context_length - 2] + [EOT]`` per caption, zero-padded, in one int64 array."""
        is_end = flat == _END_OF_TEXT  # (N,)
        ends = np.flatnonzero(is_end)  # (B,)
        starts = np.concatenate([[0], ends[:-1] + 1])  # (B,)
        row = np.cumsum(is_end) - is_end  # (N,) caption of each entry
        position = np.arange(len(flat)) - starts[row]  # (N,) index within its caption
        keep = ~is_end & (position < self.context_length - 2)
        out = np.zeros((len(ends), self.context_length), np.int64)
        out[row[keep], position[keep] + 1] = flat[keep]
        out[:, 0] = self.sot_token_id
        out[np.arange(len(ends)), np.minimum(ends - starts, self.context_length - 2) + 1] = self.eot_token_id
        return out


def _packed(ids: Iterable[int]) -> bytes:
    return array("q", ids).tobytes()  # native int64, as np.frombuffer(..., np.int64) reads it


def _bounded_update(cache: dict, fresh: dict, capacity: int) -> None:
    """Add ``fresh`` to ``cache``, first emptying it if it would outgrow ``capacity`` (cheaper than LRU)."""
    if len(cache) + len(fresh) > capacity:
        cache.clear()
    if len(fresh) <= capacity:
        cache.update(fresh)


def get_tokenizer(context_length: int = DEFAULT_CONTEXT_LENGTH) -> CLIPTokenizer:
    """The shared CLIP tokenizer for ``context_length``, built once per process (under a second)."""
    return _shared_tokenizer(context_length)


@cache
def _shared_tokenizer(context_length: int) -> CLIPTokenizer:
    return CLIPTokenizer(context_length)
