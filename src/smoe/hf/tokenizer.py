"""Tokenizers across the Hugging Face boundary.

smoe's byte tokenizer (``{"type": "smoe-byte"}``) has no tokenizer class in transformers, but
it is exactly a ``tokenizers`` byte-level BPE without merges whose ids 0-255 are the bytes
(GPT-2's byte-to-character table) plus ``<|eos|>`` at 256: export writes that
(:func:`byte_tokenizer_json`), import recognises it and writes smoe's byte spec back. smoe's
BPE tokenizer is already a ``tokenizers`` JSON and is copied as is, either way. An HF tokenizer
without ``<|eos|>`` is not imported: smoe's BPE tokenizer needs that token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["EOS_TOKEN", "byte_tokenizer_json", "is_byte_tokenizer", "export_tokenizer",
           "import_tokenizer"]

#: smoe's end-of-document token (smoe.data's BPE tokenizer; the byte tokenizer's id 256).
EOS_TOKEN = "<|eos|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ``tokenizers``' ByteLevel uses)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer_json(eos_token: str = EOS_TOKEN) -> str:
    """smoe's ByteTokenizer as a ``tokenizers`` JSON (what transformers' AutoTokenizer loads):
    a byte-level BPE without merges whose ids 0-255 are the bytes, and ``eos_token`` id 256.

    It encodes every text to its UTF-8 bytes like smoe's, with one difference: the literal
    text ``<|eos|>`` is read as the special token (as smoe's BPE tokenizer does), not as bytes.
    """
    table = _bytes_to_unicode()
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": False}
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 256, "content": eos_token, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {table[b]: b for b in range(256)}, "merges": []},
    }
    return json.dumps(spec, ensure_ascii=False, indent=2) + "\n"


def is_byte_tokenizer(spec: Any) -> bool:
    """Whether a ``tokenizers`` JSON is exactly :func:`byte_tokenizer_json` (up to layout)."""
    try:
        return (json.loads(byte_tokenizer_json(EOS_TOKEN))["model"] == spec["model"]
                and [(t["id"], t["content"]) for t in spec["added_tokens"]]
                == [(256, EOS_TOKEN)]
                and spec.get("pre_tokenizer", {}).get("type") == "ByteLevel"
                and not spec["pre_tokenizer"].get("use_regex", True)
                and spec.get("normalizer") is None)
    except (KeyError, TypeError, AttributeError):
        return False


def _tokenizer_config(eos: str | None, max_len: int) -> str:
    spec: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if eos is not None:
        spec["eos_token"] = eos
    spec.update(model_max_length=max_len, clean_up_tokenization_spaces=False)
    return json.dumps(spec, indent=2) + "\n"


def export_tokenizer(source: Path | None, out: Path, max_len: int, vocab: int,
                     notes: list[str]) -> tuple[int | None, str | None]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out`` for smoe's
    ``tokenizer.json`` at ``source`` (nothing, and a note, if there is none). Returns (eos id,
    what was written)."""
    if source is None or not source.is_file():
        notes.append("no tokenizer.json: the HF folder has no tokenizer")
        return None, None
    try:
        text = source.read_text(encoding="utf-8")
        spec = json.loads(text)
        if not (isinstance(spec, dict) and spec.get("type") == "smoe-byte"):
            ids = _added_tokens(spec)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(source)!r} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(source)!r} is not valid JSON ({e.msg} at line {e.lineno}): fix "
                         "or remove the tokenizer") from None
    except ValueError as e:
        raise ValueError(f"{str(source)!r} is not a tokenizer: {e}") from None
    if spec.get("type") == "smoe-byte":
        eos_id, kind = 256, "byte-level (smoe's byte tokenizer as a tokenizers BPE without merges)"
        text = byte_tokenizer_json()
        notes.append("the byte tokenizer is written as an equivalent byte-level tokenizers "
                     "model; the literal text <|eos|> is the eos token there")
    else:
        if EOS_TOKEN not in ids:
            notes.append(f"tokenizer.json has no {EOS_TOKEN}: copied without an eos token")
            eos_id = None
        else:
            eos_id = int(ids[EOS_TOKEN])
        kind = "BPE (copied)"
    if eos_id is not None and eos_id >= vocab:
        raise ValueError(f"the tokenizer's eos id {eos_id} is outside the model's vocabulary "
                         f"({vocab})")
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    eos = EOS_TOKEN if eos_id is not None else None
    (out / "tokenizer_config.json").write_text(_tokenizer_config(eos, max_len), encoding="utf-8")
    return eos_id, kind


def _added_tokens(spec: Any) -> dict[str, int]:
    """content -> id of a ``tokenizers`` JSON's added tokens (``ValueError`` if malformed)."""
    if not isinstance(spec, dict):
        raise ValueError(f"it holds a JSON {type(spec).__name__}, not a tokenizers object")
    tokens = spec.get("added_tokens", [])
    if not isinstance(tokens, list) or not all(
            isinstance(t, dict) and isinstance(t.get("id"), int) for t in tokens):
        raise ValueError("its added_tokens is not a list of {content, id} objects")
    return {t.get("content"): t["id"] for t in tokens}


def import_tokenizer(hf_dir: Path, out: Path, notes: list[str],
                     vocab_size: int | None = None) -> str | None:
    """Write smoe's ``tokenizer.json`` into ``out`` for the HF folder's tokenizer when smoe can
    use it; returns its kind (``byte``, ``bpe``), or None (and a note). A tokenizer that is
    missing, malformed, unusable by smoe or larger than the model's vocabulary is left out
    with a note: the weights are still imported, and ``smoe generate`` needs a tokenizer."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        notes.append("no tokenizer.json in the HF folder: the run has no tokenizer "
                     "(smoe generate needs one)")
        return None
    skipped = (f"tokenizer.json not imported ({{}}): the run has no tokenizer (smoe generate "
               "needs one)")
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
        ids = _added_tokens(spec)
    except (OSError, UnicodeDecodeError) as e:
        notes.append(skipped.format(f"unreadable: {e}"))
        return None
    except json.JSONDecodeError as e:
        notes.append(skipped.format(f"not valid JSON: {e.msg} at line {e.lineno}"))
        return None
    except ValueError as e:
        notes.append(skipped.format(str(e)))
        return None
    if is_byte_tokenizer(spec):
        from smoe.data.tokenizer import ByteTokenizer

        kind, write = "byte", lambda: ByteTokenizer().save(out)
    elif EOS_TOKEN in ids:
        kind = "bpe"

        def write() -> None:
            (out / "tokenizer.json").write_text(text, encoding="utf-8")
    else:
        notes.append(f"tokenizer.json not imported: smoe's BPE tokenizer needs a {EOS_TOKEN} "
                     "special token, this one has none (smoe generate needs a tokenizer)")
        return None
    write()
    try:  # smoe must be able to load it, and every id must be a row of the embedding
        from smoe.data import load_tokenizer

        vocab = load_tokenizer(out).vocab_size
    except Exception as e:  # the tokenizers library raises its own exception types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        (out / "tokenizer.json").unlink(missing_ok=True)
        notes.append(skipped.format(f"smoe cannot load it: {reason}"))
        return None
    if vocab_size is not None and vocab > vocab_size:
        (out / "tokenizer.json").unlink(missing_ok=True)
        notes.append(skipped.format(f"it has {vocab} ids, the model's vocabulary {vocab_size}"))
        return None
    return kind
