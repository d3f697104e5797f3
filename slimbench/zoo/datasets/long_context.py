"""Long-context examples generated from the embedded corpus with a seed (RULER's synthetic tasks,
passkey retrieval): offline, reproducible, versioned by :data:`GENERATOR_VERSION`.

Every builder returns the prompt in two parts, ``context`` (the instructions and the haystack
with what must be found in it) and ``query`` (the question and the answer prefix the model
continues), and the references the answer is scored against. :func:`fit` finds the largest
haystack for which ``tokens(context) + tokens(query) + max_new_tokens <= length`` (RULER's rule:
the generated tokens count against the length) by rebuilding the example with the same seed and
another haystack size: an example is regenerated to fit, never cut. The seed of an example is
``f"{seed}/{task}/{length}/{depth}/{index}"``, so examples do not depend on which others are asked.

Sources followed (cite these, not this file): RULER (Hsieh et al., 2024; NVIDIA/RULER
``scripts/data/synthetic/{constants,niah,variable_tracking,common_words_extraction}.py``):
templates, answer prefixes, needle sentence, 7-digit values, the noise haystack, variable chains
(one chain, four hops, five-letter names, one demonstration), common-word counts (30/3 at 4k
tokens and beyond, 6/1 below, with a 40- or 20-word demonstration). Passkey: Mohtashami & Jaggi
(2023, Landmark Attention) as used by LongLoRA (task line, noise, pass key line, question;
key uniform in 1..50000). Deviations, all for offline use: the essay haystack is the corpus' test
split (RULER: Paul Graham essays), needle keys and common words are words of that split (RULER:
the ``wonderwords`` lists), and the needle depth of the single and multi-key needle tasks is a
swept parameter (0-100% of the haystack's sentences, as RULER's depth-controlled generator and
gkamradt's ``needlehaystack`` place it) instead of random.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

GENERATOR_VERSION = "1"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will "
                 "quiz you about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for {query} "
                 "mentioned in the provided text?")
NIAH_PREFIX = " The special magic {kind} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will "
                "quiz you about the important information there.")
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@dataclass
class Parts:
    """One generated prompt, before tokenization."""

    context: str
    query: str
    answers: list[str]
    meta: dict = field(default_factory=dict)


# -- the corpus: sentences for the haystack, words for keys and lists ----------------------------
@lru_cache(maxsize=1)
def corpus_sentences() -> tuple[str, ...]:
    """Sentences of the Shakespeare test split, whitespace collapsed (RULER: essays, ``\\s+`` -> " ")."""
    from slimbench.zoo.corpora import shakespeare_documents

    text = re.sub(r"\s+", " ", " ".join(t for _, t in shakespeare_documents("test")))
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if s)


@lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    """Distinct lowercase words (4-10 letters) of the test split, sorted: keys and common-word lists."""
    words = {w.lower() for s in corpus_sentences() for w in re.findall(r"[A-Za-z]+", s)}
    return tuple(sorted(w for w in words if 4 <= len(w) <= 10))


def number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def word_key(rng: random.Random) -> str:
    """A needle key: two corpus words joined by '-' (RULER: an adjective-noun pair)."""
    words = corpus_words()
    return f"{rng.choice(words)}-{rng.choice(words)}"


def singular(template: str) -> str:
    """RULER's rewrite for one queried value."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


# -- builders: (seed, units, depth) -> Parts; `units` is the haystack size ------------------------
def essay_haystack(rng: random.Random, units: int) -> list[str]:
    sents = corpus_sentences()
    start = rng.randrange(len(sents))
    return [sents[(start + i) % len(sents)] for i in range(units)]


def needle_task(seed: str, units: int, depth: float, keys: int = 1, values: int = 1, haystack: str = "essay") -> Parts:
    """RULER NIAH: ``keys`` needles (the first is queried, at ``depth``), each with ``values`` values.

    Single: keys 1, values 1. Multi-key (``niah_multikey_1``): 4 keys, the distractors at random
    depths. Multi-value (``niah_multivalue``): 1 key, 4 values, each needle at a random depth.
    """
    rng = random.Random(seed)
    kind = "numbers"
    names = []
    while len(names) < keys:
        k = word_key(rng)
        if k not in names:
            names.append(k)
    vals = [[number(rng) for _ in range(values)] for _ in names]
    sents = essay_haystack(rng, units) if haystack == "essay" else [NOISE] * units
    placed = []  # (sentence index, needle)
    for ki, name in enumerate(names):
        for vi, v in enumerate(vals[ki]):
            fixed = ki == 0 and values == 1
            frac = depth if fixed else rng.choice([round(100 * i / 39) for i in range(40)])  # RULER's 40 depths
            placed.append((int(units * frac / 100), ki * values + vi, NEEDLE.format(kind=kind, key=name, value=v)))
    for pos, _, text in sorted(placed, reverse=True):  # insert from the back so earlier indices hold
        sents.insert(pos, text)
    one = values == 1
    template = singular(NIAH_TEMPLATE + NIAH_PREFIX) if one else NIAH_TEMPLATE + NIAH_PREFIX
    tkind = kind[:-1] if one else kind
    head, tail = template.split("{context}")
    sep = " " if haystack == "essay" else "\n"
    return Parts(head.format(kind=tkind, query=names[0]) + sep.join(sents), tail.format(kind=tkind, query=names[0]),
                 list(vals[0]), {"keys": names, "depth": depth})


def passkey_task(seed: str, units: int, depth: float) -> Parts:
    """Passkey retrieval (Landmark Attention's prompt): the key line after ``depth``% of the noise."""
    rng = random.Random(seed)
    key = str(rng.randint(1, 50000))
    before = int(units * depth / 100)
    lines = [PASSKEY_TASK, " ".join([NOISE] * before), PASSKEY_LINE.format(key=key),
             " ".join([NOISE] * (units - before))]
    return Parts("\n".join(lines), "\n" + PASSKEY_QUESTION, [key], {"depth": depth})


def variable_chain(rng: random.Random, hops: int, letters: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        n = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if n not in names:
            names.append(n)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, chain


def vt_text(rng: random.Random, units: int, hops: int, letters: int) -> tuple[str, list[str]]:
    names, chain = variable_chain(rng, hops, letters)
    sents = [NOISE] * units
    positions = sorted(rng.sample(range(units), len(chain))) if units >= len(chain) else list(range(len(chain)))
    for j, p in enumerate(positions):
        sents.insert(p + j, chain[j])
    value = chain[0].split("=")[-1].strip()
    text = (VT_TEMPLATE + VT_PREFIX).format(context="\n".join(sents), query=value, num_v=hops + 1)
    return text, names


def variable_tracking_task(seed: str, units: int, depth: float | None = None, hops: int = 4) -> Parts:
    """RULER variable tracking: one chain of ``hops`` re-assignments in noise, after one demonstration."""
    rng = random.Random(seed)
    demo, demo_names = vt_text(random.Random(seed + "/demo"), 10, hops, 3)
    text, names = vt_text(rng, max(units, hops + 1), hops, 5)
    head, tail = text.split("\nQuestion:")
    return Parts(demo + " " + " ".join(demo_names) + "\n\n" + head, "\nQuestion:" + tail, names, {})


def cwe_list(rng: random.Random, words: int, common: int, uncommon: int, n_common: int = 10) -> tuple[str, list[str]]:
    vocab = corpus_words()
    if words > len(vocab):
        raise ValueError(f"common-word extraction asked for {words} distinct words; the corpus has {len(vocab)}")
    chosen = rng.sample(vocab, words)
    top, rest = chosen[:n_common], chosen[n_common:]
    items = top * common + rest * uncommon
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), top


def common_words_task(seed: str, units: int, depth: float | None = None, length: int = 4096) -> Parts:
    """RULER common-word extraction: ``units`` distinct words, the 10 most common repeated."""
    rng = random.Random(seed)
    big = length >= 4096
    demo_ctx, demo_top = cwe_list(random.Random(seed + "/demo"), 40 if big else 20, 10 if big else 3, 3 if big else 1)
    ctx, top = cwe_list(rng, max(units, 11), 30 if big else 6, 3 if big else 1)
    demo = (CWE_TEMPLATE + CWE_PREFIX).format(context=demo_ctx) + " " + " ".join(
        f"{i + 1}. {w}" for i, w in enumerate(demo_top))
    head, tail = CWE_TEMPLATE.format(context=ctx).split("\nQuestion:")
    return Parts(demo + "\n" + head, "\nQuestion:" + tail + CWE_PREFIX, top, {})


# -- fitting a prompt to a token budget -----------------------------------------------------------
@dataclass
class Fitted:
    parts: Parts
    context_ids: list[int]
    query_ids: list[int]
    units: int

    @property
    def tokens(self) -> int:
        return len(self.context_ids) + len(self.query_ids)


def fit(build: Callable[[int], Parts], encode: Callable[[str], list[int]], budget: int, min_fill: float = 0.8,
        max_units: int = 10**6) -> Fitted:
    """The example with the largest haystack whose prompt has at most ``budget`` tokens.

    Raises if even the smallest haystack does not fit, or if the best fit leaves more than
    ``max(1 - min_fill of the budget, 128 tokens)`` unused (one haystack sentence may be long):
    never truncates.
    """
    def make(u: int) -> Fitted:
        p = build(u)
        return Fitted(p, encode(p.context), encode(p.query), u)

    lo_fit = make(1)
    if lo_fit.tokens > budget:
        raise ValueError(f"the smallest example has {lo_fit.tokens} prompt tokens, over the budget of {budget}")
    hi = 2
    while hi < max_units and make(hi).tokens <= budget:
        hi *= 2
    lo = hi // 2  # fits; hi does not (or is the cap)
    best = make(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = make(mid)
        if cand.tokens <= budget:
            lo, best = mid, cand
        else:
            hi = mid
    slack = max((1 - min_fill) * budget, 128)
    if budget - best.tokens > slack:
        raise ValueError(f"the best example has {best.tokens} prompt tokens, more than {slack:.0f} under the budget "
                         f"of {budget}: the haystack cannot grow further")
    return best
