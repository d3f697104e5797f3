"""The papers' perplexity corpora, for the ``perplexity`` task (protocol ``concat-windows``).

Registered through module-level ``CORPUS`` (needs ``slimbench.zoo.datasets`` among the CORPORA
registry's packages). Splits map onto SlimBench's: ``test`` and ``validation`` are the
datasets' own, ``calibration`` is their training split. What each split's documents are, so
that the perplexity task's ``"\\n\\n"`` join reproduces the GPTQ / SparseGPT evaluation text:

- ``wikitext2``: ``Salesforce/wikitext`` (the Hub's name for ``wikitext`` since 2024), config
  ``wikitext-2-raw-v1``, one document per row of ``text`` (GPTQ: ``"\\n\\n".join(test["text"])``).
- ``ptb``: ``ptb_text_only`` / ``penn_treebank``, the sentences already joined with ``" "``
  into one document (GPTQ's "new eval" join). Its hub copy is a loading script, which
  ``datasets`` 4 and later no longer run: use a local copy.
- ``c4``: ``allenai/c4``: test/validation = the first 1100 documents of
  ``en/c4-validation.00000-of-00008.json.gz`` joined with ``" "`` into one document (GPTQ's
  validation subset; GPTQ then keeps the first 256 windows of seqlen, while ``max_windows``
  spreads its windows evenly: set ``max_windows`` null and compare the first 256 to match it
  exactly); calibration = the first 5,000 documents of ``en/c4-train.00000-of-01024.json.gz``
  (about 2.4 M GPT-2 tokens, 9x GPTQ's 128 x 2048 and 4.6x Wanda's 128 x 4096 at Llama-2's
  length). The whole shard (356k documents, 809 MB of text) would be tokenized at once by the
  calibration sampler, which takes hours and more memory than most machines have; GPTQ samples
  its 128 documents from the whole shard instead.

Offline: put local copies at ``$SLIMBENCH_DATA/<corpus>/<split>.<ext>`` (``.jsonl``,
``.json``, ``.parquet``, ``.txt`` / ``.raw``; ``wiki.test.raw`` renamed ``test.raw`` works).
Online (``HF_HUB_OFFLINE=0``): the hub copy at a pinned commit, ``$SLIMBENCH_REVISION_<CORPUS>``
if set, else the commit in ``REVISIONS`` (unpinned loads are refused). The record's data
manifest stores a sha256 of the text either way.
"""

from __future__ import annotations

import os
from functools import lru_cache

from slimbench.zoo.corpora import SPLITS, Corpus
from slimbench.zoo.datasets.readers import DataError, HubSource, Rows, data_root, read_hub, read_local

EXTS = (".jsonl", ".json", ".parquet", ".txt", ".raw")
C4_VALIDATION_DOCS = 1100
C4_CALIBRATION_DOCS = 5000

SOURCES: dict[str, dict[str, HubSource]] = {
    "wikitext2": {s: HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", h)
                  for s, h in (("test", "test"), ("validation", "validation"), ("calibration", "train"))},
    "ptb": {s: HubSource("ptb_text_only", "penn_treebank", h)
            for s, h in (("test", "test"), ("validation", "validation"), ("calibration", "train"))},
    "c4": {  # the GPTQ files are data_files of allenai/c4, loaded without a config name (see readers.read_hub)
        "test": HubSource("allenai/c4", None, "validation", data_files="en/c4-validation.00000-of-00008.json.gz"),
        "validation": HubSource("allenai/c4", None, "validation",
                                data_files="en/c4-validation.00000-of-00008.json.gz"),
        "calibration": HubSource("allenai/c4", None, "train", data_files="en/c4-train.00000-of-01024.json.gz"),
    },
}
# Hub commits the corpora load by default. Salesforce/wikitext and allenai/c4: commits that
# public projects pin for these files (the project's machines cannot reach the hub to re-check
# them; `reproduce --dry-run` online reports a commit the hub does not know). ptb: none (see above).
REVISIONS: dict[str, str] = {
    "wikitext2": "b08601e04326c79dfdd32d625aee71d232d685c3",
    "c4": "1588ec454efa1a09f29cd18ddd04fe05fc8653a2",
}
FIELD = {"wikitext2": "text", "ptb": "sentence", "c4": "text"}
LOCAL = "(.jsonl|.json|.parquet|.txt|.raw)"
LIMIT = {("c4", "test"): C4_VALIDATION_DOCS, ("c4", "validation"): C4_VALIDATION_DOCS,
         ("c4", "calibration"): C4_CALIBRATION_DOCS}


def local_file(corpus: str, split: str):
    root = data_root()
    if root is None:
        return None
    for ext in EXTS:
        path = root / corpus / f"{split}{ext}"
        if path.exists():
            return path
    return None


def revision(corpus: str) -> str | None:
    """The hub commit the corpus loads: ``$SLIMBENCH_REVISION_<CORPUS>``, else the default pin."""
    return os.environ.get(f"SLIMBENCH_REVISION_{corpus.upper()}") or REVISIONS.get(corpus)


def hub_source(corpus: str, split: str) -> tuple[HubSource, str]:
    """Where the split comes from online, and at which commit; DataError if it cannot load online."""
    rev = revision(corpus)
    if corpus == "ptb":
        raise DataError(
            f"corpus 'ptb' split {split!r}: no local copy at $SLIMBENCH_DATA/ptb/{split}{LOCAL}, and the hub copy "
            "(ptb_text_only) is a loading script, which `datasets` 4 and later do not run"
        )
    if not rev:
        raise DataError(
            f"corpus {corpus!r} split {split!r}: no local copy at $SLIMBENCH_DATA/{corpus}/{split}{LOCAL} "
            f"and no pinned hub commit in $SLIMBENCH_REVISION_{corpus.upper()}"
        )
    return SOURCES[corpus][split], rev


def raw_rows(corpus: str, split: str, path: str = "", rev: str | None = None) -> tuple[list[dict], str]:
    """The split's rows and where they came from: the local copy at ``path``, else the hub at ``rev``."""
    if path:
        return read_local(path), path
    src, rev = hub_source(corpus, split)
    return read_hub(src, rev, limit=LIMIT.get((corpus, split))), src.label(rev)


def documents(corpus: str, split: str) -> list[tuple[str, str]]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    return _documents(corpus, split, str(local_file(corpus, split) or ""), revision(corpus))


@lru_cache(maxsize=16)
def _documents(corpus: str, split: str, path: str, rev: str | None) -> list[tuple[str, str]]:
    # Keyed by where the data comes from: a changed $SLIMBENCH_DATA or revision is other data.
    raw, where = raw_rows(corpus, split, path, rev)
    rows = Rows(where, raw)
    field = "text" if where.endswith((".txt", ".raw")) else FIELD[corpus]
    texts = [rows.text(n, r, field) for n, r in rows]
    if corpus == "wikitext2":
        return [(f"{split}:{i}", t) for i, t in enumerate(texts)]
    if corpus == "c4":
        texts = texts[: LIMIT[(corpus, split)]]  # local copies may hold the whole file
        if split == "calibration":
            return [(f"{split}:{i}", t) for i, t in enumerate(texts)]
    return [(f"{split}:joined", " ".join(texts))]


documents.cache_clear = _documents.cache_clear  # what tests that change $SLIMBENCH_DATA call


CORPUS = [
    Corpus("wikitext2", "WikiText-2 raw (one document per row; GPTQ's \\n\\n join)",
           lambda s: documents("wikitext2", s)),
    Corpus("ptb", "Penn Treebank, text only (sentences joined with ' ', GPTQ new eval)", lambda s: documents("ptb", s)),
    Corpus("c4", "C4 en: first 1100 validation documents joined with ' ' (GPTQ); calibration = the first "
           f"{C4_CALIBRATION_DOCS:,} documents of train shard 0", lambda s: documents("c4", s)),
]
