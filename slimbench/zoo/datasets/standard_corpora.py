"""The papers' perplexity corpora, for the ``perplexity`` task (protocol ``concat-windows``).

Registered through module-level ``CORPUS`` (needs ``slimbench.zoo.datasets`` among the CORPORA
registry's packages). Splits map onto SlimBench's: ``test`` and ``validation`` are the
datasets' own, ``calibration`` is their training split. What each split's documents are, so
that the perplexity task's ``"\\n\\n"`` join reproduces the GPTQ / SparseGPT evaluation text:

- ``wikitext2``: ``wikitext`` / ``wikitext-2-raw-v1``, one document per row of ``text``
  (GPTQ: ``"\\n\\n".join(test["text"])``).
- ``ptb``: ``ptb_text_only`` / ``penn_treebank``, the sentences already joined with ``" "``
  into one document (GPTQ's "new eval" join).
- ``c4``: ``allenai/c4``: test/validation = the first 1100 documents of
  ``en/c4-validation.00000-of-00008.json.gz`` joined with ``" "`` into one document (GPTQ's
  validation subset; GPTQ then keeps the first 256 windows of seqlen, while ``max_windows``
  spreads its windows evenly: set ``max_windows`` null and compare the first 256 to match it
  exactly); calibration = the documents of ``en/c4-train.00000-of-01024.json.gz``.

Offline: put local copies at ``$SLIMBENCH_DATA/<corpus>/<split>.<ext>`` (``.jsonl``,
``.json``, ``.parquet``, ``.txt`` / ``.raw``; ``wiki.test.raw`` renamed ``test.raw`` works).
Online: the hub at the commit given by ``$SLIMBENCH_REVISION_<CORPUS>`` (unpinned loads are
refused). The record's data manifest stores a sha256 of the text either way.
"""

from __future__ import annotations

import os
from functools import lru_cache

from slimbench.zoo.corpora import SPLITS, Corpus
from slimbench.zoo.datasets.readers import DataError, HubSource, Rows, data_root, read_hub, read_local

EXTS = (".jsonl", ".json", ".parquet", ".txt", ".raw")
C4_VALIDATION_DOCS = 1100

SOURCES: dict[str, dict[str, HubSource]] = {
    "wikitext2": {s: HubSource("wikitext", "wikitext-2-raw-v1", h)
                  for s, h in (("test", "test"), ("validation", "validation"), ("calibration", "train"))},
    "ptb": {s: HubSource("ptb_text_only", "penn_treebank", h)
            for s, h in (("test", "test"), ("validation", "validation"), ("calibration", "train"))},
    "c4": {
        "test": HubSource("allenai/c4", "en/c4-validation.00000-of-00008.json.gz", "validation"),
        "validation": HubSource("allenai/c4", "en/c4-validation.00000-of-00008.json.gz", "validation"),
        "calibration": HubSource("allenai/c4", "en/c4-train.00000-of-01024.json.gz", "train"),
    },
}
FIELD = {"wikitext2": "text", "ptb": "sentence", "c4": "text"}


def local_file(corpus: str, split: str):
    root = data_root()
    if root is None:
        return None
    for ext in EXTS:
        path = root / corpus / f"{split}{ext}"
        if path.exists():
            return path
    return None


def raw_rows(corpus: str, split: str) -> tuple[list[dict], str]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    path = local_file(corpus, split)
    if path is not None:
        return read_local(path), str(path)
    revision = os.environ.get(f"SLIMBENCH_REVISION_{corpus.upper()}")
    if not revision:
        raise DataError(
            f"corpus {corpus!r} split {split!r}: no local copy at $SLIMBENCH_DATA/{corpus}/{split}.<{'|'.join(EXTS)}> "
            f"and no pinned hub commit in $SLIMBENCH_REVISION_{corpus.upper()}"
        )
    src = SOURCES[corpus][split]
    if corpus == "c4":  # the GPTQ files are data_files of allenai/c4, not configs
        from datasets import load_dataset

        ds = load_dataset(src.dataset, data_files={src.split: src.config}, split=src.split, revision=revision)
        return [dict(r) for r in ds], f"hub:{src.dataset}/{src.config}@{revision}"
    return read_hub(src, revision), f"hub:{src.dataset}/{src.config}@{revision}"


@lru_cache(maxsize=16)
def documents(corpus: str, split: str) -> list[tuple[str, str]]:
    raw, where = raw_rows(corpus, split)
    rows = Rows(where, raw)
    field = "text" if where.endswith((".txt", ".raw")) else FIELD[corpus]
    texts = [rows.text(n, r, field) for n, r in rows]
    if corpus == "wikitext2":
        return [(f"{split}:{i}", t) for i, t in enumerate(texts)]
    if corpus == "c4" and split != "calibration":
        texts = texts[:C4_VALIDATION_DOCS]
    if corpus == "c4" and split == "calibration":
        return [(f"{split}:{i}", t) for i, t in enumerate(texts)]
    return [(f"{split}:joined", " ".join(texts))]


CORPUS = [
    Corpus("wikitext2", "WikiText-2 raw (one document per row; GPTQ's \\n\\n join)",
           lambda s: documents("wikitext2", s)),
    Corpus("ptb", "Penn Treebank, text only (sentences joined with ' ', GPTQ new eval)", lambda s: documents("ptb", s)),
    Corpus("c4", "C4 en: first 1100 validation documents joined with ' ' (GPTQ); calibration = train shard 0",
           lambda s: documents("c4", s)),
]
