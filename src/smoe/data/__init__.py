"""The data layer: corpora, byte/BPE tokenization, the train/validation split and batching.

Typical use by a trainer::

    data = prepare_data(DataConfig(tokenizer="byte"), run_dir="runs/x")
    batches = Batcher(data.train, batch_size=16, seq_len=256, seed=0)
    x_BT, y_BT, domain_BT = next(batches)            # state: batches.state_dict()
    val = val_batches(data.val, batch_size=16, seq_len=256, max_batches=20)
    bpb = bits_per_byte(val_loss, data.val.bytes_per_token())

``tokenizers`` (for BPE) is imported only when a BPE is trained or loaded.
"""

from smoe.data.batching import Batch, Batcher, bits_per_byte, val_batches
from smoe.data.corpus import (
    AUSTEN_INSTALL_COMMAND,
    DOMAINS,
    PROVENANCE,
    Corpus,
    Document,
    Source,
    code_corpus,
    default_corpus,
    find_austen,
    load_path,
    load_paths,
    prose_corpus,
)
from smoe.data.dataset import (
    TOKENIZERS,
    Block,
    DataConfig,
    PreparedData,
    TokenStream,
    default_cache_dir,
    prepare_data,
    split_corpus,
    tokenize_blocks,
)
from smoe.data.tokenizer import (
    TOKENIZER_FILE,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "AUSTEN_INSTALL_COMMAND",
    "DOMAINS",
    "PROVENANCE",
    "TOKENIZERS",
    "TOKENIZER_FILE",
    "Batch",
    "Batcher",
    "Block",
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "DataConfig",
    "Document",
    "PreparedData",
    "Source",
    "TokenStream",
    "Tokenizer",
    "bits_per_byte",
    "code_corpus",
    "default_cache_dir",
    "default_corpus",
    "find_austen",
    "load_path",
    "load_paths",
    "load_tokenizer",
    "prepare_data",
    "prose_corpus",
    "split_corpus",
    "tokenize_blocks",
    "val_batches",
]
