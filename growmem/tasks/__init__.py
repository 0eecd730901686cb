"""Tasks: data only (MQAR, S-NIAH, language-modelling corpora, tokenizers); no model code."""

from growmem.tasks._common import IGNORE_INDEX, fold_seed
from growmem.tasks.corpus import (
    SPLITS,
    TokenBlocks,
    hf_text_dataset,
    load_corpus,
    split_of,
    stdlib_corpus,
    text_files,
)
from growmem.tasks.mqar import (
    MQARConfig,
    MQARSlice,
    MQARSplits,
    generate_mqar,
    mqar_accuracy,
    mqar_accuracy_by_slice,
    mqar_splits,
)
from growmem.tasks.niah import (
    NIAHExample,
    depth_grid,
    make_niah_example,
    niah_dataset,
    niah_tokenizer,
    niah_training_batch,
    score_exact_match,
    stdlib_essay,
)
from growmem.tasks.sampling import EpochSampler
from growmem.tasks.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    find_tokenizer,
    load_tokenizer,
)

__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "BPETokenizer",
    "ByteTokenizer",
    "EpochSampler",
    "MQARConfig",
    "MQARSlice",
    "MQARSplits",
    "NIAHExample",
    "TokenBlocks",
    "Tokenizer",
    "depth_grid",
    "find_tokenizer",
    "fold_seed",
    "generate_mqar",
    "hf_text_dataset",
    "load_corpus",
    "load_tokenizer",
    "make_niah_example",
    "mqar_accuracy",
    "mqar_accuracy_by_slice",
    "mqar_splits",
    "niah_dataset",
    "niah_tokenizer",
    "niah_training_batch",
    "score_exact_match",
    "split_of",
    "stdlib_corpus",
    "stdlib_essay",
    "text_files",
]
