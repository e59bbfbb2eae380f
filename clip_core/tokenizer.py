"""CLIP's lower-cased byte-level BPE tokenizer with an end-of-word marker ``</w>``.

The tokenizer reproduces OpenAI CLIP's ``SimpleTokenizer`` token ids exactly while running
the BPE itself in HuggingFace ``tokenizers`` (Rust), so batches are encoded quickly:

* text cleaning (Python): ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse
  whitespace runs to one space, strip, lower-case;
* pre-tokenization: OpenAI's word regex (contractions, letter runs, single digits, runs of
  other non-space characters; whitespace is dropped), then GPT-2's byte-to-unicode mapping;
* BPE with ``</w>`` appended to the last symbol of every word;
* ids laid out as in OpenAI's vocabulary: the 256 byte characters, the same 256 with
  ``</w>``, one token per merge in merge order, then ``<|startoftext|>`` and
  ``<|endoftext|>`` as the last two ids.

Known differences from OpenAI's reference:

* the literal strings ``<|startoftext|>`` / ``<|endoftext|>`` inside a caption are tokenized
  as ordinary text, never as the special tokens, so a caption cannot inject control tokens;
* letter/number classes come from ``tokenizers``' regex engine (Oniguruma), whose Unicode
  tables can lag the ``regex`` module the reference uses: code points assigned only in the
  newest Unicode versions (e.g. CJK Extension J) may split differently. The reference's own
  output for such characters changes with the installed ``regex`` version.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, trainers

__all__ = [
    "END_OF_TEXT",
    "END_OF_WORD",
    "OPENAI_NUM_MERGES",
    "START_OF_TEXT",
    "ClipTokenizer",
    "ContextLengthError",
    "clean_text",
]

END_OF_WORD = "</w>"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"

#: Number of merges OpenAI's CLIP uses from ``bpe_simple_vocab_16e6.txt.gz``:
#: 49152 - 256 - 2 = 48,894, giving a 49,408-token vocabulary.
OPENAI_NUM_MERGES = 49152 - 256 - 2

#: OpenAI's word pattern without the special-token alternatives (the text is lower-cased
#: before it is applied, so the reference's IGNORECASE flag changes nothing).
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

#: First line of merges files written by :meth:`ClipTokenizer.save`. Files whose header
#: starts with this marker are loaded with all their merges by default.
_SAVE_HEADER = "#version: 0.2 clipops-bpe"

_N_BASE = 256
_N_LAYOUT_FIXED = 2 * _N_BASE + 2  # byte chars, byte chars + </w>, sot, eot

_WHITESPACE_RE = re.compile(r"\s+")


class ContextLengthError(ValueError):
    """Raised when a text needs more tokens than the tokenizer's context length."""


def clean_text(text: str) -> str:
    """Clean a caption the way OpenAI's CLIP tokenizer does before BPE.

    Applies ``ftfy.fix_text``, ``html.unescape`` twice, strips, collapses every whitespace run
    to a single space, strips again and lower-cases.

    Raises:
        TypeError: if ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = _WHITESPACE_RE.sub(" ", text.strip()).strip()
    return text.lower()


def _byte_table() -> list[tuple[int, str]]:
    """``(byte value, printable character)`` pairs in GPT-2/CLIP's byte-to-unicode order.

    Bytes that are printable and not whitespace (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``)
    stand for themselves and come first; the remaining 68 bytes follow in byte order, mapped
    to ``chr(256)``, ``chr(257)``, ...  This order is also the order of the first 256 ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    printable_set = set(printable)
    others = [b for b in range(_N_BASE) if b not in printable_set]
    table = [(b, chr(b)) for b in printable]
    table += [(b, chr(_N_BASE + i)) for i, b in enumerate(others)]
    return table


_BYTE_TABLE = _byte_table()
_BYTE_CHARS = [c for _, c in _BYTE_TABLE]
_BYTE_DECODER = {c: b for b, c in _BYTE_TABLE}


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """OpenAI's word split followed by the byte-to-unicode mapping (no prefix space)."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _check_merges(merges: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Validate merges against the OpenAI layout and return them as a list of tuples.

    Every part must already be a token when its merge is applied (a byte character, a byte
    character + ``</w>``, or the result of an earlier merge), and no merge may produce a token
    that already exists (each merge owns exactly one id).
    """
    known = set(_BYTE_CHARS) | {c + END_OF_WORD for c in _BYTE_CHARS}
    out: list[tuple[str, str]] = []
    for i, merge in enumerate(merges):
        if not isinstance(merge, tuple | list) or len(merge) != 2:
            raise ValueError(f"merge {i} must be a pair of strings, got {merge!r}")
        a, b = merge
        if not isinstance(a, str) or not isinstance(b, str):
            raise ValueError(f"merge {i} must be a pair of strings, got {merge!r}")
        for part in (a, b):
            if part not in known:
                raise ValueError(
                    f"merge {i} ({a!r}, {b!r}): {part!r} is neither a byte-level symbol nor "
                    "produced by an earlier merge"
                )
        if a + b in known:
            raise ValueError(f"merge {i} ({a!r}, {b!r}) produces an existing token {a + b!r}")
        known.add(a + b)
        out.append((a, b))
    return out


def _merges_from_trained(tok: Tokenizer) -> list[tuple[str, str]]:
    """Read the ordered merges out of a trained ``tokenizers`` BPE model."""
    raw = json.loads(tok.to_str())["model"]["merges"]
    merges: list[tuple[str, str]] = []
    for item in raw:
        if isinstance(item, str):  # older serialization: "a b"
            a, b = item.split(" ")
        else:
            a, b = item
        merges.append((a, b))
    return merges


def _read_merges_file(path: Path) -> tuple[str, list[str]]:
    """Return (header line, merge lines) of an OpenAI-format merges file (gzip or plain)."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    lines = data.decode("utf-8").split("\n")
    while lines and lines[-1].strip("\r") == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: empty merges file (expected a header line)")
    return lines[0], lines[1:]


class ClipTokenizer:
    """CLIP's byte-level BPE tokenizer with OpenAI's vocabulary layout.

    Call the instance on a string or a sequence of strings to get a zero-padded
    ``LongTensor`` of shape ``[batch, context_length]``; each row is
    ``[sot, tokens..., eot, 0, ...]``.

    Attributes:
        context_length: number of token positions per row (including sot and eot).
        vocab_size: ``514 + len(merges)``.
        sot_token_id: id of ``<|startoftext|>`` (``vocab_size - 2``).
        eot_token_id: id of ``<|endoftext|>`` (``vocab_size - 1``).
        merges: the BPE merges in priority order.
    """

    context_length: int
    vocab_size: int
    sot_token_id: int
    eot_token_id: int
    merges: list[tuple[str, str]]

    def __init__(self, merges: Sequence[tuple[str, str]], context_length: int = 77) -> None:
        """Build a tokenizer from ordered BPE merges (see :meth:`from_merges`)."""
        if isinstance(context_length, bool) or not isinstance(context_length, int):
            raise TypeError(f"context_length must be int, got {type(context_length).__name__}")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (sot + eot), got {context_length}")
        self.merges = _check_merges(merges)
        self.context_length = context_length

        tokens = list(_BYTE_CHARS)
        tokens += [c + END_OF_WORD for c in _BYTE_CHARS]
        tokens += [a + b for a, b in self.merges]
        tokens += [START_OF_TEXT, END_OF_TEXT]
        self._tokens = tokens
        self._token_to_id = {tok: i for i, tok in enumerate(tokens)}
        self.vocab_size = len(tokens)
        self.sot_token_id = self.vocab_size - 2
        self.eot_token_id = self.vocab_size - 1

        # Bytes each id stands for when decoding; </w> becomes a trailing space.
        id_bytes: list[bytes] = []
        for tok in tokens[: self.sot_token_id]:
            if tok.endswith(END_OF_WORD):
                body = tok[: -len(END_OF_WORD)]
                id_bytes.append(bytes(_BYTE_DECODER[c] for c in body) + b" ")
            else:
                id_bytes.append(bytes(_BYTE_DECODER[c] for c in tok))
        id_bytes += [b"", b""]
        self._id_bytes = id_bytes

        model = models.BPE(
            vocab=self._token_to_id, merges=list(self.merges), end_of_word_suffix=END_OF_WORD
        )
        backend = Tokenizer(model)
        backend.pre_tokenizer = _pre_tokenizer()
        backend.post_processor = processors.TemplateProcessing(
            single=f"{START_OF_TEXT} $A {END_OF_TEXT}",
            special_tokens=[(START_OF_TEXT, self.sot_token_id), (END_OF_TEXT, self.eot_token_id)],
        )
        self._backend = backend

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_merges(
        cls, merges: Sequence[tuple[str, str]], context_length: int = 77
    ) -> ClipTokenizer:
        """Build a tokenizer from ordered merges ``[(left, right), ...]``.

        Merge parts are byte-level strings (as in OpenAI's merges file); a part may end with
        ``</w>``. Raises ``ValueError`` if a part is unknown when its merge applies or a merge
        would produce an already existing token.
        """
        return cls(merges, context_length=context_length)

    @classmethod
    def from_merges_file(
        cls,
        path: str | os.PathLike[str],
        context_length: int = 77,
        max_merges: int | None = None,
    ) -> ClipTokenizer:
        """Load merges in OpenAI's format: one header line, then one ``"left right"`` per line.

        The file may be gzip-compressed (detected from its content) or plain text.
        ``max_merges=None`` loads all merges of a file written by :meth:`save`; for any other
        file (e.g. OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, which lists more merges than CLIP
        uses) it keeps OpenAI's first ``OPENAI_NUM_MERGES`` (48,894) merges, giving CLIP's
        49,408-token vocabulary. An explicit ``max_merges`` keeps at most that many.
        """
        if max_merges is not None and max_merges < 0:
            raise ValueError(f"max_merges must be >= 0, got {max_merges}")
        file_path = Path(path)
        header, lines = _read_merges_file(file_path)
        if max_merges is None and not header.startswith(_SAVE_HEADER):
            max_merges = OPENAI_NUM_MERGES
        if max_merges is not None:
            lines = lines[:max_merges]
        merges: list[tuple[str, str]] = []
        for lineno, line in enumerate(lines, start=2):
            parts = line.rstrip("\r").split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ValueError(f"{file_path}:{lineno}: expected 'left right', got {line!r}")
            merges.append((parts[0], parts[1]))
        return cls(merges, context_length=context_length)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        context_length: int = 77,
        min_frequency: int = 2,
    ) -> ClipTokenizer:
        """Learn BPE merges on cleaned ``texts`` and build a tokenizer in OpenAI's layout.

        Merges are learned by ``tokenizers``' ``BpeTrainer`` on :func:`clean_text` output with
        the same pre-tokenization as encoding. The result has ``vocab_size = 514 + n_merges``,
        at most the requested ``vocab_size`` (fewer if the corpus runs out of pairs occurring
        at least ``min_frequency`` times). Training is deterministic for the same input.

        Raises:
            ValueError: if ``vocab_size < 515`` (room for at least one merge is required).
            TypeError: if an element of ``texts`` is not a ``str``.
        """
        if vocab_size < _N_LAYOUT_FIXED + 1:
            raise ValueError(
                f"vocab_size must be >= {_N_LAYOUT_FIXED + 1} (256 byte tokens, 256 byte+</w> "
                f"tokens, 2 specials and at least one merge), got {vocab_size}"
            )
        if min_frequency < 0:
            raise ValueError(f"min_frequency must be >= 0, got {min_frequency}")
        cleaned = [clean_text(t) for t in texts]

        backend = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
        backend.pre_tokenizer = _pre_tokenizer()
        # The word-final symbols ("x</w>") are passed as the trainer's special tokens only to
        # give them fixed ids: otherwise the trainer numbers them in hash-map order, and since
        # it breaks count ties by token id, the learned merges would differ between runs.
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 2,  # trainer vocab: 512 fixed symbols + merged tokens
            min_frequency=min_frequency,
            show_progress=False,
            special_tokens=[c + END_OF_WORD for c in _BYTE_CHARS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            end_of_word_suffix=END_OF_WORD,
        )
        backend.train_from_iterator(cleaned, trainer=trainer)

        # One id per merge in the OpenAI layout: drop any merge whose result already exists
        # (the trainer can reach the same string through two different splits).
        known = set(_BYTE_CHARS) | {c + END_OF_WORD for c in _BYTE_CHARS}
        merges: list[tuple[str, str]] = []
        for a, b in _merges_from_trained(backend):
            if a + b in known or a not in known or b not in known:
                continue
            known.add(a + b)
            merges.append((a, b))
        merges = merges[: vocab_size - _N_LAYOUT_FIXED]
        return cls(merges, context_length=context_length)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the merges in OpenAI's format (gzip when ``path`` ends with ``.gz``).

        The file round-trips through :meth:`from_merges_file` (all merges are reloaded; the
        context length is not stored).
        """
        file_path = Path(path)
        lines = [f"{_SAVE_HEADER} n_merges={len(self.merges)}"]
        lines += [f"{a} {b}" for a, b in self.merges]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        if file_path.name.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        file_path.write_bytes(data)

    def reference(self) -> dict[str, object]:
        """Identify this tokenizer for run metadata and model manifests.

        ``merges_sha256`` is the SHA-256 of the merges as UTF-8 ``"left right\\n"`` lines in
        order (no header), so it is the same however the merges were loaded or saved.
        """
        digest = hashlib.sha256()
        for a, b in self.merges:
            digest.update(f"{a} {b}\n".encode())
        return {
            "kind": "clip-bpe",
            "vocab_size": self.vocab_size,
            "n_merges": len(self.merges),
            "merges_sha256": digest.hexdigest(),
            "context_length": self.context_length,
        }

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab(self) -> list[str]:
        """All tokens, indexed by id (a copy)."""
        return list(self._tokens)

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary token (e.g. ``"dog</w>"``); raises ``KeyError`` if unknown."""
        return self._token_to_id[token]

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """Clean and tokenize one text: ``[sot, ..., eot]``, no padding and no length check."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return list(self._backend.encode(clean_text(text)).ids)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Turn ids back into (cleaned) text.

        Drops sot/eot and the zero padding after the last eot; ``</w>`` becomes a space and
        the result is stripped. Accepts a sequence of ints or a 1-D tensor.
        Invalid UTF-8 byte sequences (e.g. a cut multi-byte character) decode to U+FFFD.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor, got shape {tuple(ids.shape)}")
            id_list: list[int] = ids.tolist()
        else:
            id_list = [int(i) for i in ids]
        if self.eot_token_id in id_list:
            last_eot = len(id_list) - 1 - id_list[::-1].index(self.eot_token_id)
            if all(i == 0 for i in id_list[last_eot + 1 :]):
                id_list = id_list[: last_eot + 1]
        out = bytearray()
        for i in id_list:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            out += self._id_bytes[i]
        return out.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], truncate: bool = False) -> torch.Tensor:
        """Tokenize one text or a batch into a zero-padded ``LongTensor [B, context_length]``.

        Raises:
            TypeError: if ``texts`` is not a ``str`` or a sequence of ``str``.
            ContextLengthError: if a text needs more than ``context_length`` tokens (sot and
                eot included) and ``truncate`` is false; the message names the text's index
                and its token count. With ``truncate=True`` the first ``context_length``
                tokens are kept and the last kept one is replaced by eot.
        """
        if isinstance(texts, str):
            batch: list[str] = [texts]
        elif isinstance(texts, Sequence) and not isinstance(texts, bytes | bytearray):
            batch = list(texts)
            for i, t in enumerate(batch):
                if not isinstance(t, str):
                    raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
        else:
            raise TypeError(f"texts must be str or a sequence of str, got {type(texts).__name__}")

        length = self.context_length
        encodings = self._backend.encode_batch_fast([clean_text(t) for t in batch])
        # Filling a preallocated numpy array row by row is ~20x faster than torch.tensor() on
        # nested lists.
        out = np.zeros((len(encodings), length), dtype=np.int64)
        for i, enc in enumerate(encodings):
            ids = enc.ids
            if len(ids) > length:
                if not truncate:
                    raise ContextLengthError(
                        f"text at index {i} has {len(ids)} tokens (including sot/eot), more "
                        f"than context_length={length}; shorten it or pass truncate=True"
                    )
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[i, : len(ids)] = ids
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        """Short description: vocabulary size and context length."""
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, "
            f"context_length={self.context_length})"
        )
