"""Standard benchmarks read from small local files in each dataset's format (tests/data/)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from slimbench.tasks import _zero_shot as zs
from slimbench.tasks import multiple_choice as mc

from slimbench.config import build_config
from slimbench.errors import SuiteError
from slimbench.registry import CORPORA, TASKS
from slimbench.specs import HardwareSpec
from slimbench.task import TaskContext

DATA = Path(__file__).parent / "data"
CTX = TaskContext(hardware=HardwareSpec(threads=2))
FILES = {
    "hellaswag": "hellaswag.jsonl", "piqa": "piqa.jsonl", "arc-easy": "arc_easy.jsonl",
    "arc-challenge": "arc_challenge.jsonl", "winogrande": "winogrande.jsonl", "boolq": "boolq.jsonl",
}


def build(task: str, **params):
    return build_config(TASKS.get(task).config, params, source="test", field=task)


def examples(task: str) -> list[mc.Example]:
    cfg = build(task, path=str(DATA / FILES[task]))
    builder = {"hellaswag": zs.hellaswag, "piqa": zs.piqa, "arc-easy": zs.arc, "arc-challenge": zs.arc,
               "winogrande": zs.winogrande, "boolq": zs.boolq}[task]
    return zs.examples(cfg, zs.HubSource("x", None, "y"), builder)[0]


def test_prompts_are_the_harness_prompts():
    h = examples("hellaswag")[0]
    assert h.requests[3] == ("Roof shingle removal: A man is sitting on a roof. He",
                             " starts pulling up roofing on a roof.")
    assert h.gold == 3 and h.choice_chars[3] == len("starts pulling up roofing on a roof.")
    p = examples("piqa")[1]
    assert p.requests[0] == ("Question: dresser\nAnswer:", " replace drawer with bobby pin ") and p.gold == 1
    a = examples("arc-easy")[2]
    assert a.requests[3] == ("Question: Which object is the best conductor of electricity?\nAnswer:", " iron nail")
    assert a.gold == 3  # answerKey "4" among labels 1..4
    w = examples("winogrande")[1]
    assert w.requests == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                          ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))
    assert w.gold == 1
    b = examples("boolq")[4]
    assert b.requests[1][0].endswith("\nQuestion: is elder scrolls online the same as skyrim?\nAnswer:")
    assert b.requests == ((b.requests[0][0], " no"), (b.requests[0][0], " yes")) and b.gold == 0


def test_hellaswag_preprocess_matches_lm_eval():
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    for s in ["Making a sandwich: [header] How to make a sandwich [title] Get bread.", "  a  [step] b [title] c "]:
        assert zs.hellaswag_preprocess(s) == utils.preprocess(s)


@pytest.mark.parametrize("task", sorted(FILES))
def test_each_benchmark_runs_offline_and_matches_the_plain_loop(tiny_llama, task):
    cfg = build(task, path=str(DATA / FILES[task]), batch_size=3)
    res = TASKS.get(task).evaluate(tiny_llama, cfg, CTX)
    plain = mc.score_plain(tiny_llama, examples(task))
    assert res.details["per_example"]["acc"] == plain.acc
    assert res.details["per_example"]["acc_norm"] == plain.acc_norm
    assert res.metrics["acc"].value == pytest.approx(sum(plain.acc) / len(plain.acc))
    assert res.details["data"]["source"].endswith(FILES[task])


def test_a_local_file_is_named_as_the_data_read_not_the_hub_dataset():
    source = zs.HubSource("ybisk/piqa", None, "validation")
    local = zs.provenance(build("piqa", path=str(DATA / "piqa.jsonl")), source, str(DATA / "piqa.jsonl"))
    assert local["read"] == "local file" and local["source"].endswith("piqa.jsonl")
    assert "hub" not in local and local["format_of"] == "ybisk/piqa:validation"  # whose format it follows
    online = zs.provenance(build("piqa", revision="abc123").model_copy(), source, "hub:ybisk/piqa/@abc123")
    assert online["read"] == "hub" and online["hub"] == "ybisk/piqa:validation" and online["revision"] == "abc123"


@pytest.mark.parametrize(
    ("task", "file", "expected"),
    [
        ("hellaswag", "bad_hellaswag_missing_endings.jsonl",
         r"bad_hellaswag_missing_endings.jsonl: row 2: field 'endings': missing"),
        ("arc-easy", "bad_arc_answer.jsonl", r"bad_arc_answer.jsonl: row 1: field 'answerKey': 'E' is not one of"),
        ("piqa", "bad_piqa_label.jsonl",
         r"bad_piqa_label.jsonl: row 3: field 'label': expected an integer in 0\.\.1, got 2"),
        ("boolq", "bad_boolq_not_json.jsonl", r"bad_boolq_not_json.jsonl: row 2: not a JSON object"),
        ("winogrande", "piqa.jsonl", r"piqa.jsonl: row 1: field 'sentence': missing"),
        ("lambada", "arc_easy.jsonl", r"arc_easy.jsonl: row 1: field 'text': missing"),
        ("wikitext-rolling", "lambada.jsonl", r"lambada.jsonl: row 1: field 'page': missing"),
        ("boolq", "no_such_file.jsonl", r"no_such_file.jsonl: no such file"),
    ],
)
def test_a_bad_file_names_the_file_the_row_and_the_field(task, file, expected):
    with pytest.raises(SuiteError, match=expected):
        build(task, path=str(DATA / file))


def test_online_use_needs_a_pinned_revision():
    with pytest.raises(SuiteError, match=r"give `path`.*or `revision`"):
        build("hellaswag")
    assert build("hellaswag", revision="abc123").revision == "abc123"  # validated without network


def test_lambada_is_last_word_scoring(tiny_llama):
    from slimbench.tasks import lambada

    cfg = build("lambada", path=str(DATA / "lambada.jsonl"))
    reqs, _ = lambada.requests(cfg)
    assert reqs[1] == (reqs[1][0], " Shane") and reqs[1][0].endswith("on my own,")
    res = TASKS.get("lambada").evaluate(tiny_llama, cfg, CTX)
    lls = [ll for ll, _ in tiny_llama.loglikelihood(reqs)]
    assert res.metrics["perplexity"].value == pytest.approx(math.exp(-sum(lls) / 3), rel=1e-6)


def test_wikitext_rolling_is_the_harness_word_perplexity(tiny_llama):
    import re

    from slimbench.tasks import wikitext_rolling as wr

    pre = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    cfg = build("wikitext-rolling", path=str(DATA / "wikitext_document_level.jsonl"), max_length=16)
    docs, _ = wr.pages(cfg)
    for d in docs:
        assert wr.detokenize(d) == pre.wikitext_detokenizer({"page": d})
    res = TASKS.get("wikitext-rolling").evaluate(tiny_llama, cfg, CTX)
    lls = tiny_llama.loglikelihood_rolling([wr.detokenize(d) for d in docs], max_length=16)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    assert res.metrics["word_perplexity"].value == pytest.approx(math.exp(-sum(lls) / words), rel=1e-6)
    assert res.details["protocol"] == "lm-eval-rolling"


@pytest.fixture
def std_corpora(monkeypatch):
    from slimbench.zoo.datasets import standard_corpora as sc

    monkeypatch.setenv("SLIMBENCH_DATA", str(DATA / "corpora"))
    sc.documents.cache_clear()
    for c in sc.CORPUS:  # until the registry walks slimbench.zoo.datasets itself
        if c.name not in CORPORA:
            CORPORA.register(c, origin="test")
    yield sc
    sc.documents.cache_clear()


def test_standard_corpora_follow_the_gptq_joins(std_corpora):
    import json

    def rows(name):
        return [json.loads(x) for x in (DATA / "corpora" / name / "test.jsonl").read_text().splitlines()]

    wt = CORPORA.get("wikitext2").texts("test")
    assert "\n\n".join(wt) == "\n\n".join(r["text"] for r in rows("wikitext2"))  # GPTQ: "\n\n".join(test["text"])
    assert CORPORA.get("ptb").texts("test") == [" ".join(r["sentence"] for r in rows("ptb"))]
    assert CORPORA.get("c4").texts("test") == [" ".join(r["text"] for r in rows("c4")[:1100])]
    with pytest.raises(SuiteError, match=r"no local copy at \$SLIMBENCH_DATA/ptb/calibration"):
        CORPORA.get("ptb").texts("calibration")


def test_perplexity_task_runs_on_a_standard_corpus(std_corpora, tiny_llama):
    task = TASKS.get("perplexity")
    res = task.evaluate(tiny_llama, task.config(corpus="wikitext2", seqlen=16, max_windows=4), CTX)
    assert res.details["protocol"] == "concat-windows" and res.details["windows"] >= 4
    assert res.details["data"]["corpus"] == "wikitext2"


MINIMAL = {
    **{t: {"path": str(DATA / f)} for t, f in FILES.items()},
    "lambada": {"path": str(DATA / "lambada.jsonl")},
    "wikitext-rolling": {"path": str(DATA / "wikitext_document_level.jsonl")},
    "shakespeare-cloze": {}, "shakespeare-lastword": {}, "fidelity": {}, "embedding-fidelity": {},
}


@pytest.mark.parametrize("task", sorted(MINIMAL))
def test_task_configs_round_trip(task):
    cfg = build(task, **MINIMAL[task])
    again = build(task, **cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert TASKS.get(task).version
