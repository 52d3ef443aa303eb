"""From a corpus to token streams: the train/validation split, tokenization and its cache.

The split (:func:`split_corpus`) works per domain. Every document is cut into blocks of at
most ``block_chars`` characters, at a line end where one falls in the second half of the block
(smaller blocks for a small domain, so that each domain has at least ``MIN_BLOCKS``). Blocks are
ranked by SHA-256 of ``(document key, block index)`` and taken into validation in rank order until
they hold ``val_fraction`` of the domain's characters; the rest is train. Both keep document
order. So the split is deterministic, disjoint by construction (no text is in both), spread
over every document, and each domain has its share in validation. A document's key is its path
relative to the data path the user gave (a file given directly: its name; the default corpus:
the stdlib-relative path, the novel's name), so a corpus folder moved or copied elsewhere is
split the same way.

A :class:`TokenStream` is one split as a 1-D token tensor with a parallel domain-id tensor;
``eos`` follows the last block of each document. A trained BPE and the streams it tokenized
are cached under ``cache_dir``, keyed by a hash of the corpus text and the settings (byte
tokenization takes well under a second and is not cached); the streams as safetensors (never
pickle; without the ``safetensors`` package they are not cached), every file written through a
temporary file and ``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from smoe._io import atomic_write_bytes
from smoe.config import config_error
from smoe.data.corpus import Corpus, default_corpus, load_path
from smoe.data.tokenizer import (
    TOKENIZER_FILE,
    BPETokenizer,
    ByteTokenizer,
    load_tokenizer,
)

__all__ = [
    "TOKENIZERS",
    "MIN_BLOCKS",
    "DataConfig",
    "Block",
    "TokenStream",
    "PreparedData",
    "split_corpus",
    "tokenize_blocks",
    "prepare_data",
    "default_cache_dir",
]

#: Tokenizer kinds accepted by :class:`DataConfig`.
TOKENIZERS = ("byte", "bpe")
#: Each domain is cut into at least this many blocks (when it has that many characters).
MIN_BLOCKS = 40
#: Part of every cache key: bumped when what is cached, or how, changes (3: safetensors
#: streams, split keys relative to the data paths).
_CACHE_FORMAT = 3


def default_cache_dir() -> Path:
    """``$SMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/smoe``, else ``~/.cache/smoe``."""
    if os.environ.get("SMOE_CACHE_DIR"):
        return Path(os.environ["SMOE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "smoe"


@dataclass
class DataConfig:
    """What data a run trains on and how it is tokenized and split.

    paths: files or folders of the user's (see :func:`smoe.data.load_path`); empty: the default
        two-domain corpus (:func:`smoe.data.default_corpus`).
    tokenizer: ``byte`` (257 ids, nothing to train) or ``bpe`` (trained on the train split).
    bpe_vocab_size: vocabulary of the BPE, special token included (at least 257).
    val_fraction: share of each domain's characters held out for validation, in (0, 0.5].
    block_chars: the split's block size in characters.
    code_bytes: cap on the default corpus's code domain; ``None`` matches the prose size.
    cache_dir: where trained BPEs and their token streams are cached; ``None``:
        :func:`default_cache_dir`. ``use_cache=False`` neither reads nor writes it.
    """

    paths: tuple[str, ...] = ()
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05
    block_chars: int = 32768
    code_bytes: int | None = None
    cache_dir: str | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = (str(self.paths),)
        self.paths = tuple(str(p) for p in self.paths)
        if self.tokenizer not in TOKENIZERS:
            raise config_error("tokenizer", self.tokenizer, f"must be one of {TOKENIZERS}")
        v = self.bpe_vocab_size
        if isinstance(v, bool) or not isinstance(v, int) or v < 257:
            raise config_error("bpe_vocab_size", v, "must be an int >= 257")
        f = self.val_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 0.5:
            raise config_error("val_fraction", f, "must be a number in (0, 0.5]")
        b = self.block_chars
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise config_error("block_chars", b, "must be a positive integer")
        c = self.code_bytes
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise config_error("code_bytes", c, "must be a positive integer or None")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


class Block(NamedTuple):
    """A piece of one document: its text, domain, source, index in the document, and whether
    it is the document's last piece (followed by ``eos`` in a stream)."""

    text: str
    domain: str
    source: str
    index: int
    last: bool


def _cut(text: str, size: int) -> list[str]:
    """``text`` in pieces of at most ``size`` characters, ending at a line end when one falls
    in the second half of the piece."""
    pieces, start, n = [], 0, len(text)
    while start < n:
        end = min(start + size, n)
        if end < n:
            nl = text.rfind("\n", start + size // 2, end)
            if nl >= 0:
                end = nl + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def split_corpus(
    corpus: Corpus,
    val_fraction: float = 0.05,
    block_chars: int = 32768,
    keys: Sequence[str] | None = None,
) -> tuple[list[Block], list[Block]]:
    """Deterministic, disjoint train and validation blocks (see the module docstring).

    ``keys``: one name per document, hashed to rank its blocks (default: each document's
    ``source``); :func:`prepare_data` passes the paths relative to the data paths given.
    """
    if keys is None:
        keys = [d.source for d in corpus.documents]
    elif len(keys) != len(corpus.documents):
        raise ValueError(f"keys has {len(keys)} entries for {len(corpus.documents)} documents")
    if not 0 < val_fraction <= 0.5:
        raise config_error("val_fraction", val_fraction, "must be a number in (0, 0.5]")
    if block_chars < 1:
        raise config_error("block_chars", block_chars, "must be a positive integer")
    val_keys: set[tuple[int, int]] = set()
    blocks_by_doc: list[list[str]] = [[] for _ in corpus.documents]
    for domain in corpus.domains:
        members = [i for i, d in enumerate(corpus.documents) if d.domain == domain]
        chars = sum(len(corpus.documents[i].text) for i in members)
        size = max(1, min(block_chars, math.ceil(chars / MIN_BLOCKS)))
        ranked = []
        for i in members:
            doc = corpus.documents[i]
            blocks_by_doc[i] = _cut(doc.text, size)
            for j, piece in enumerate(blocks_by_doc[i]):
                rank = hashlib.sha256(f"{keys[i]}\x00{j}".encode()).digest()
                ranked.append((rank, i, j, len(piece)))
        ranked.sort()
        target, held = val_fraction * chars, 0
        for _, i, j, n in ranked[: max(0, len(ranked) - 1)]:  # train keeps at least one block
            if held >= target:
                break
            val_keys.add((i, j))
            held += n
    train: list[Block] = []
    val: list[Block] = []
    for i, doc in enumerate(corpus.documents):
        pieces = blocks_by_doc[i]
        for j, piece in enumerate(pieces):
            block = Block(piece, doc.domain, doc.source, j, j == len(pieces) - 1)
            (val if (i, j) in val_keys else train).append(block)
    return train, val


@dataclass(frozen=True)
class TokenStream:
    """One split as token ids ``tokens_N`` (int32) and domain ids ``domains_N`` (uint8, an index
    into ``domain_names``), with the UTF-8 bytes of its text per domain."""

    tokens_N: torch.Tensor
    domains_N: torch.Tensor
    domain_names: tuple[str, ...]
    num_bytes: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.tokens_N.numel())

    def num_tokens(self, domain: str | None = None) -> int:
        if domain is None:
            return len(self)
        return int((self.domains_N == self._domain_id(domain)).sum())

    def bytes_per_token(self, domain: str | None = None) -> float:
        """UTF-8 bytes of text per token (``eos`` counts as a token of no bytes): multiply a
        loss in bits per token by ``1 / bytes_per_token`` for bits per byte."""
        n = self.num_tokens(domain)
        if n == 0:
            raise ValueError(f"domain={domain!r} has no tokens in this stream")
        b = sum(self.num_bytes) if domain is None else self.num_bytes[self._domain_id(domain)]
        return b / n

    def bytes_per_token_by_domain(self) -> dict[str | None, float]:
        """``{None: overall, domain: per domain, ...}`` for the domains that have tokens."""
        out: dict[str | None, float] = {None: self.bytes_per_token()} if len(self) else {}
        for name in self.domain_names:
            if self.num_tokens(name):
                out[name] = self.bytes_per_token(name)
        return out

    def _domain_id(self, domain: str) -> int:
        if domain not in self.domain_names:
            raise ValueError(f"domain={domain!r} is invalid: one of {self.domain_names}")
        return self.domain_names.index(domain)


def tokenize_blocks(blocks: list[Block], tokenizer, domain_names: tuple[str, ...]) -> TokenStream:
    """Concatenate the blocks' token ids, with ``eos`` after each document's last block."""
    ids = tokenizer.encode_batch([b.text for b in blocks])
    eos = torch.tensor([tokenizer.eos_id], dtype=torch.int32)
    pieces: list[torch.Tensor] = []
    lengths: list[int] = []
    domain_of_piece: list[int] = []
    num_bytes = [0] * len(domain_names)
    for block, ids_L in zip(blocks, ids):
        d = domain_names.index(block.domain)
        pieces.append(ids_L)
        if block.last:
            pieces.append(eos)
        lengths.append(ids_L.numel() + int(block.last))
        domain_of_piece.append(d)
        num_bytes[d] += len(block.text.encode("utf-8"))
    tokens_N = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)
    domains_N = torch.repeat_interleave(
        torch.tensor(domain_of_piece, dtype=torch.int64),
        torch.tensor(lengths, dtype=torch.int64),
    ).to(torch.uint8)
    return TokenStream(tokens_N.to(torch.int32), domains_N, tuple(domain_names), tuple(num_bytes))


@dataclass(frozen=True)
class PreparedData:
    """Everything the trainer needs from the data layer."""

    tokenizer: ByteTokenizer | BPETokenizer
    train: TokenStream
    val: TokenStream
    corpus: Corpus


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _save_streams(streams: dict[str, TokenStream], path: Path) -> None:
    """Write the streams as one safetensors file, atomically (a temporary file, then
    ``os.replace``): ``<name>/tokens_N`` (uint16 ids when they fit), ``<name>/domain_runs_R`` and
    ``<name>/domain_counts_R`` (the domain ids as runs); names and byte counts as metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for name, s in streams.items():
        small = len(s) == 0 or int(s.tokens_N.max()) < 2**16
        runs_R, counts_R = torch.unique_consecutive(s.domains_N, return_counts=True)
        tensors[f"{name}/tokens_N"] = (s.tokens_N.to(torch.uint16) if small else s.tokens_N)
        tensors[f"{name}/domain_runs_R"] = runs_R.contiguous()
        tensors[f"{name}/domain_counts_R"] = counts_R.contiguous()
        meta[name] = {"domain_names": list(s.domain_names), "num_bytes": list(s.num_bytes)}
    atomic_write_bytes(path, save(tensors, metadata={"format": "smoe-token-streams",
                                                     "streams": json.dumps(meta)}))


def _load_streams(path: Path) -> dict[str, TokenStream]:
    """The streams :func:`_save_streams` wrote (safetensors and JSON only, never pickle)."""
    from safetensors import safe_open

    out: dict[str, TokenStream] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["streams"])
        for name, m in meta.items():
            domains_N = torch.repeat_interleave(f.get_tensor(f"{name}/domain_runs_R"),
                                                f.get_tensor(f"{name}/domain_counts_R"))
            out[name] = TokenStream(
                f.get_tensor(f"{name}/tokens_N").to(torch.int32),
                domains_N.to(torch.uint8),
                tuple(m["domain_names"]),
                tuple(int(b) for b in m["num_bytes"]),
            )
    return out


def _has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _relative_key(source: str, root: str) -> str:
    """A user document's split key: its path relative to the data path it was found under
    (a file given directly: its name)."""
    base = Path(root)
    if not base.is_dir():
        return base.name
    try:
        return Path(source).relative_to(base).as_posix()
    except ValueError:  # not under the root as written: fall back to the path itself
        return Path(source).as_posix()


def _build_tokenizer(config: DataConfig, train: list[Block], key: str, cache: Path | None):
    if config.tokenizer == "byte":
        return ByteTokenizer()
    path = cache / f"bpe-{key}.json" if cache is not None else None
    if path is not None and path.is_file():
        return BPETokenizer.from_file(path)
    tok = BPETokenizer.train((b.text for b in train), config.bpe_vocab_size)
    if path is not None:
        tok.save(path)
    return tok


def prepare_data(config: DataConfig, run_dir: str | Path | None = None, *,
                 tokenizer: ByteTokenizer | BPETokenizer | None = None) -> PreparedData:
    """Load the corpus, split it, get the tokenizer and the two token streams.

    With ``run_dir``, an existing ``run_dir/tokenizer.json`` is reused (a resumed run keeps its
    tokenizer); otherwise the tokenizer is built (a BPE is trained on the train split only) and
    saved there. ``tokenizer``: use this one as is (its kind must be ``config.tokenizer``;
    ``run_dir`` is then not read or written). Raises ``FileNotFoundError``/``ValueError``
    naming a missing or empty path.
    """
    if config.paths:
        docs, keys = [], []
        for root in config.paths:
            loaded = load_path(root)
            docs += loaded
            keys += [_relative_key(d.source, root) for d in loaded]
        corpus = Corpus(tuple(docs))
    else:
        corpus = default_corpus(code_bytes=config.code_bytes)
        keys = [d.source for d in corpus.documents]  # already relative: stdlib:..., novel names
    train_blocks, val_blocks = split_corpus(corpus, config.val_fraction, config.block_chars, keys)
    cache = None
    if config.use_cache:
        cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    split_key = _key(
        corpus=corpus.fingerprint(),
        keys=hashlib.sha256("\x00".join(keys).encode("utf-8", "surrogatepass")).hexdigest(),
        val_fraction=config.val_fraction,
        block_chars=config.block_chars,
        format=_CACHE_FORMAT,
    )

    saved = Path(run_dir) / TOKENIZER_FILE if run_dir is not None else None
    if tokenizer is not None:
        if tokenizer.kind != config.tokenizer:
            raise ValueError(f"tokenizer={config.tokenizer!r} does not match the {tokenizer.kind} "
                             "tokenizer given")
    elif saved is not None and saved.is_file():
        tokenizer = load_tokenizer(saved)
        if tokenizer.kind != config.tokenizer:
            raise ValueError(
                f"tokenizer={config.tokenizer!r} does not match {saved}, a {tokenizer.kind} "
                "tokenizer: use a new run folder or the same tokenizer"
            )
    else:
        bpe_key = _key(split=split_key, vocab=config.bpe_vocab_size)
        tokenizer = _build_tokenizer(config, train_blocks, bpe_key, cache)
        if run_dir is not None:
            tokenizer.save(run_dir)

    stream_path = None  # byte tokenization is as fast as reading a cache: only BPE is cached
    if cache is not None and config.tokenizer == "bpe" and _has_safetensors():
        key = _key(split=split_key, tok=tokenizer.fingerprint())
        stream_path = cache / f"tokens-v{_CACHE_FORMAT}-{key}.safetensors"
    stored = None
    if stream_path is not None and stream_path.is_file():
        try:
            stored = _load_streams(stream_path)
            train, val = stored["train"], stored["val"]
        except Exception:  # an unreadable cache file is rebuilt, not fatal
            stored = None
    if stored is None:
        train = tokenize_blocks(train_blocks, tokenizer, corpus.domains)
        val = tokenize_blocks(val_blocks, tokenizer, corpus.domains)
        if stream_path is not None:
            _save_streams({"train": train, "val": val}, stream_path)
    return PreparedData(tokenizer, train, val, corpus)
