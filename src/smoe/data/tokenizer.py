"""Tokenizers with one small interface: bytes by default, byte-level BPE trained locally.

Both map text to token ids and back, exactly for any Unicode text (no unknown token), and have
one special token, end-of-document (``eos_id``), which ``decode`` drops. Both save to a
``tokenizer.json`` in a run folder, from which :func:`load_tokenizer` rebuilds them:

* :class:`ByteTokenizer`: ids 0-255 are the UTF-8 bytes, 256 is ``eos``; ``vocab_size`` 257.
  Its ``tokenizer.json`` is ``{"type": "smoe-byte", ...}``.
* :class:`BPETokenizer`: a byte-level BPE of the ``tokenizers`` library (GPT-2 style
  pre-tokenization, no prefix space), trained on the caller's texts; id 0 is ``<|eos|>``. Its
  ``tokenizer.json`` is the library's own format, loadable by ``tokenizers`` and transformers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from smoe._io import atomic_write_text

__all__ = [
    "TOKENIZER_FILE",
    "EOS_TOKEN",
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "load_tokenizer",
    "atomic_write_text",
]

#: The file name a tokenizer is saved under in a run folder.
TOKENIZER_FILE = "tokenizer.json"
#: The end-of-document special token of :class:`BPETokenizer`.
EOS_TOKEN = "<|eos|>"
_BYTE_TYPE = "smoe-byte"


def _json_target(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / TOKENIZER_FILE


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer, evaluation and generation use."""

    kind: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[torch.Tensor]: ...

    def save(self, path: str | Path) -> Path: ...

    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255) plus an end-of-document token (id 256)."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the byte ids; ``eos`` is dropped, broken UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids={bad[:5]!r} are invalid: byte token ids are 0..256")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Each text's ids as a 1-D int32 tensor, without a Python loop over bytes."""
        out = []
        for text in texts:
            data = bytearray(text.encode("utf-8"))
            if not data:
                out.append(torch.empty(0, dtype=torch.int32))
                continue
            out.append(torch.frombuffer(data, dtype=torch.uint8).to(torch.int32))
        return out

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` in the folder ``path`` (or to ``path`` if it ends in .json)."""
        spec = {"type": _BYTE_TYPE, "version": 1, "vocab_size": 257, "eos_id": self.eos_id}
        return atomic_write_text(_json_target(path), json.dumps(spec, indent=2) + "\n")

    def fingerprint(self) -> str:
        return f"{_BYTE_TYPE}-v1"

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


class BPETokenizer:
    """Byte-level BPE from the ``tokenizers`` library; ``<|eos|>`` is id 0."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:  # a tokenizers.Tokenizer
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token: not an smoe BPE tokenizer")
        self._tok = tokenizer
        self.eos_id = int(eos)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
        """Train a byte-level BPE of ``vocab_size`` tokens (257 or more) on ``texts``."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(
                f"vocab_size={vocab_size!r} is invalid: must be an int >= 257 "
                "(256 byte symbols and <|eos|>)"
            )
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids={bad[:5]!r} are invalid: token ids are 0..{self.vocab_size - 1}")
        return self._tok.decode(ids, skip_special_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[torch.Tensor]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [torch.tensor(e.ids, dtype=torch.int32) for e in encodings]

    def to_json(self) -> str:
        return self._tok.to_str(pretty=True)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` in the folder ``path`` (or to ``path`` if it ends in .json)."""
        return atomic_write_text(_json_target(path), self.to_json())

    def fingerprint(self) -> str:
        return "bpe-" + hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()[:32]

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(spec: str | Path) -> ByteTokenizer | BPETokenizer:
    """A tokenizer from ``"byte"``, a run folder holding ``tokenizer.json``, or a .json file.

    Raises ``FileNotFoundError`` naming the path when there is no such file.
    """
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    target = path / TOKENIZER_FILE if path.is_dir() else path
    if not target.is_file():
        raise FileNotFoundError(
            f"tokenizer {str(spec)!r}: no file {str(target)!r} (give 'byte', a run folder with "
            f"{TOKENIZER_FILE}, or a tokenizer .json file)"
        )
    text = target.read_text(encoding="utf-8")
    try:
        spec_json = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer file {str(target)!r} is not valid JSON: {e}") from None
    if isinstance(spec_json, dict) and spec_json.get("type") == _BYTE_TYPE:
        return ByteTokenizer()
    return BPETokenizer.from_file(target)
