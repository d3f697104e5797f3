"""`wikitext-rolling`: WikiText-2 word perplexity, protocol ``lm-eval-rolling`` (not the papers' number).

lm-evaluation-harness 0.4 ``wikitext`` (task version 2.0): the document-level WikiText-2 test
split (``EleutherAI/wikitext_document_level``, ``wikitext-2-raw-v1``, 62 documents, field
``page``); each document is detokenized (the harness' ``wikitext_detokenizer``), scored whole
by ``loglikelihood_rolling`` (disjoint windows of the model's maximum length, first token
predicted from the prefix token), and

- ``word_perplexity`` = exp(-sum of log-likelihoods / sum of words of the *original* pages,
  counted as ``len(re.split(r"\\s+", page))``),
- ``byte_perplexity`` = exp(-sum ll / sum UTF-8 bytes), ``bits_per_byte`` = -sum ll / bytes / ln 2.

The papers' number (GPTQ / SparseGPT / Wanda) is ``perplexity`` with corpus ``wikitext2``
(protocol ``concat-windows``); Llama-2-7B gives about 8.7 here vs 5.47 there.
"""

from __future__ import annotations

import math
import re

import numpy as np
from pydantic import Field, model_validator

from slimbench.config import Config
from slimbench.measure import stats
from slimbench.task import Metric, Task, TaskResult
from slimbench.zoo.datasets.readers import HubSource, Rows, load_rows
from slimbench.zoo.datasets.shakespeare import fingerprint

PROTOCOL = "lm-eval-rolling"
SOURCE = HubSource("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test")


class WikitextRollingConfig(Config):
    path: str | None = Field(None, description="local file (.jsonl/.json/.parquet) with a `page` field per document")
    revision: str | None = Field(None, description="hub commit to pin when loading online (needs network)")
    limit: int | None = Field(None, ge=1, description="first N documents only (null = all)")
    max_length: int | None = Field(None, ge=2, description="window length; null = the model's maximum")
    batch_size: int = Field(4, ge=1, le=256, description="windows per forward pass")
    seed: int = Field(0, description="bootstrap seed")

    @model_validator(mode="after")
    def _data_is_readable(self):
        if self.path is None and self.revision is None:
            raise ValueError(f"give `path` (a local file) or `revision` (a hub commit of {SOURCE.dataset})")
        if self.path is not None:
            pages(self)
        return self


def detokenize(string: str) -> str:
    """lm_eval/tasks/wikitext/preprocess_wikitext.py: wikitext_detokenizer, verbatim."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    string = string.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        string = string.replace(f" {p} ", f"{p} ")
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    string = string.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n").replace("\n ", "\n")
    string = string.replace(" N ", " 1 ").replace(" 's", "'s")
    return string


def pages(cfg: WikitextRollingConfig) -> tuple[list[str], str]:
    raw, where = load_rows(cfg.path, SOURCE, cfg.revision)
    rows = Rows(where, raw)
    out = [rows.text(n, r, "page") for n, r in rows]
    return (out[: cfg.limit] if cfg.limit else out), where


def evaluate(lm, cfg: WikitextRollingConfig, ctx) -> TaskResult:
    docs, where = pages(cfg)
    lls = lm.loglikelihood_rolling([detokenize(d) for d in docs], batch_size=cfg.batch_size, max_length=cfg.max_length)
    words = [len(re.split(r"\s+", d)) for d in docs]
    nbytes = [len(d.encode("utf-8")) for d in docs]
    ll, w, b = np.asarray(lls), np.asarray(words, float), np.asarray(nbytes, float)
    idx = np.arange(len(docs))
    # documents are the sampling unit: resample documents, keep the ratio-of-sums estimator
    def ratio(i: np.ndarray) -> float:
        i = i.astype(int)
        return math.exp(-ll[i].sum() / w[i].sum())

    lo, hi = stats.bootstrap_ci(idx, ratio, seed=cfg.seed)
    word_ppl = math.exp(-ll.sum() / w.sum())
    spread = {"ci_low": lo, "ci_high": hi, "n": float(len(docs))}
    return TaskResult(
        metrics={
            "word_perplexity": Metric(word_ppl, "ppl/word", False, spread=spread),
            "byte_perplexity": Metric(math.exp(-ll.sum() / b.sum()), "ppl/byte", False),
            "bits_per_byte": Metric(-ll.sum() / b.sum() / math.log(2), "bits/byte", False),
        },
        details={
            "protocol": PROTOCOL,
            "documents": len(docs),
            "words": int(w.sum()),
            "bytes": int(b.sum()),
            "max_length": cfg.max_length or lm.max_length,
            "data": {"source": where, "sha256": fingerprint(docs)},
            "per_example": {"id": [str(i) for i in idx], "loglikelihood": lls, "words": words},
        },
    )


TASK = Task(
    name="wikitext-rolling",
    version=f"{PROTOCOL}/1",
    description="WikiText-2 document-level rolling word perplexity (lm-eval `wikitext`; not the papers' protocol)",
    config=WikitextRollingConfig,
    evaluate=evaluate,
    quality_metric="word_perplexity",
    paired_metric="loglikelihood",
)
