"""Deterministic evaluation examples built from the Shakespeare corpus' ``test`` split.

Parsing (the same for both tasks): a work is cut into blocks at blank lines; a block whose
first line is a speaker tag (``KING.``, ``FIRST LORD.``) is a *speech*, its other lines (minus
stage directions, lines starting with ``[``) are its verse/prose lines. Works without speech
blocks (the poems) contribute nothing. Sampling uses ``random.Random`` seeded with the task's
seed (string seeds hash with SHA-512 in Python, so the draw is the same on every machine).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

from slimbench.registry import CORPORA

SPEAKER = re.compile(r"[A-Z][A-Za-z .'&-]*\.")
LAST_WORD = re.compile(r"^(?P<head>.*\S) (?P<word>[A-Za-z][A-Za-z']*[A-Za-z])(?P<tail>[^A-Za-z']*)$")


@dataclass(frozen=True)
class Speech:
    work: str
    index: int  # block number in the work
    speaker: str
    lines: tuple[str, ...]


def speeches(corpus: str = "shakespeare", split: str = "test") -> list[Speech]:
    out = []
    for work, text in CORPORA.get(corpus).documents(split):
        for i, block in enumerate(re.split(r"\n\s*\n", text)):
            rows = [r.rstrip() for r in block.strip("\n").split("\n")]
            if len(rows) < 2 or not SPEAKER.fullmatch(rows[0].strip()):
                continue
            lines = tuple(r.strip() for r in rows[1:] if r.strip() and not r.lstrip().startswith("["))
            if lines:
                out.append(Speech(work, i, rows[0].strip(), lines))
    return out


def fingerprint(obj) -> str:
    """sha256 of the examples as canonical JSON: two runs with the same hash saw the same data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()


@dataclass(frozen=True)
class ClozeItem:
    id: str
    context: str  # speaker tag and the preceding lines, each ending in "\n"
    choices: tuple[str, ...]
    gold: int


def cloze_items(
    n: int, *, context_lines: int = 3, choices: int = 4, min_chars: int = 20, seed: int = 0, split: str = "test"
) -> list[ClozeItem]:
    """Next-line cloze: ``context_lines`` lines of a speech; the true next line among ``choices``.

    Candidates: every line of a speech that has at least ``context_lines`` lines before it in
    the same speech and ``min_chars`` characters. ``n`` are drawn without replacement; the
    distractors are lines (also >= ``min_chars``) drawn from anywhere in the same play, never
    equal to the true line; the true line's position among the choices is drawn uniformly.
    """
    sp = speeches(split=split)
    pool: dict[str, list[str]] = {}
    for s in sp:
        pool.setdefault(s.work, []).extend(line for line in s.lines if len(line) >= min_chars)
    candidates = [
        (s, j) for s in sp for j in range(context_lines, len(s.lines)) if len(s.lines[j]) >= min_chars
    ]
    rng = random.Random(seed)
    picked = rng.sample(candidates, min(n, len(candidates)))
    items = []
    for s, j in picked:
        true = s.lines[j]
        item_id = f"{s.work}:{s.index}:{j}"
        r = random.Random(f"{seed}:{item_id}")
        others = sorted(set(pool[s.work]) - {true})
        opts = r.sample(others, choices - 1)
        gold = r.randrange(choices)
        opts.insert(gold, true)
        context = s.speaker + "\n" + "".join(line + "\n" for line in s.lines[j - context_lines : j])
        items.append(ClozeItem(item_id, context, tuple(opts), gold))
    return items


@dataclass(frozen=True)
class LastWordItem:
    id: str
    context: str  # the passage up to the last word, no trailing space
    word: str  # scored as the continuation " " + word


def lastword_items(
    n: int, *, max_lines: int = 6, min_lines: int = 3, min_word_chars: int = 3, seed: int = 0, split: str = "test"
) -> list[LastWordItem]:
    """LAMBADA-style passages: the last ``max_lines`` lines of a speech; predict its last word.

    Eligible speeches have at least ``min_lines`` lines and end in a word of at least
    ``min_word_chars`` letters preceded by a space (trailing punctuation is dropped, as
    LAMBADA's targets are bare words). ``n`` are drawn without replacement.
    """
    cands = []
    for s in speeches(split=split):
        if len(s.lines) < min_lines:
            continue
        m = LAST_WORD.match(s.lines[-1])
        if m is None or len(m["word"]) < min_word_chars:
            continue
        body = list(s.lines[-max_lines:])
        body[-1] = m["head"]
        cands.append(LastWordItem(f"{s.work}:{s.index}", s.speaker + "\n" + "\n".join(body), m["word"]))
    return random.Random(seed).sample(cands, min(n, len(cands)))
