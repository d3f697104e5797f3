"""The lm-evaluation-harness adapter (optional extra): offline with a local-file task YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from slimbench.tasks import _zero_shot as zs
from slimbench.tasks import lm_eval_harness as adapter
from slimbench.tasks import multiple_choice as mc
from slimbench.tasks import piqa

from slimbench.config import build_config
from slimbench.errors import SuiteError
from slimbench.specs import HardwareSpec
from slimbench.task import TaskContext

DATA = Path(__file__).parent / "data"
YAML = """task: slimbench_local_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def include(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    (folder / "local_piqa.yaml").write_text(YAML.format(path=DATA / "piqa.jsonl"))
    return str(folder)


def test_unknown_harness_task_fails_at_validation_before_any_model(tmp_path, include):
    from slimbench.sweep.suite import load_suite

    # with the include folder of the next test: the harness' task index (the default tasks plus
    # the folder's, seconds to build) is built once for both
    suite = tmp_path / "s.yaml"
    suite.write_text("models: [tiny-llama]\nmethods: [baseline]\ntasks:\n"
                     f"  - {{name: lm-eval, tasks: [hellaswagg], include_path: {include}}}\n")
    with pytest.raises(SuiteError, match=r"unknown lm-evaluation-harness task 'hellaswagg'\. Did you mean 'hellaswag'"):
        load_suite(suite)  # validation only: nothing is loaded


def test_harness_runs_offline_on_the_in_memory_model_and_agrees_with_our_engine(tiny_llama, include):
    cfg = build_config(adapter.LmEvalConfig, {"tasks": ["slimbench_local_piqa"], "include_path": include,
                                              "bootstrap_iters": 10}, source="t", field="lm-eval")
    res = adapter.evaluate(tiny_llama, cfg, TaskContext(hardware=HardwareSpec(threads=2)))
    local = zs.examples(piqa.TASK.config(path=str(DATA / "piqa.jsonl")), None, zs.piqa)[0]
    ours = mc.score_plain(tiny_llama, local)
    assert res.metrics["slimbench_local_piqa/acc"].value == pytest.approx(sum(ours.acc) / len(ours.acc))
    assert res.metrics["slimbench_local_piqa/acc_norm"].value == pytest.approx(sum(ours.acc_norm) / len(ours.acc_norm))
    assert "stderr" in res.metrics["slimbench_local_piqa/acc"].spread
    assert res.details["n_samples"]["slimbench_local_piqa"]["effective"] == 3


def test_our_loglikelihood_equals_the_harness_hflm(tiny_llama):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    reqs = [("To be, or not to be, that is the ", "question"), ("Friends, Romans,", " countrymen"), ("", "Hello")]
    hf = HFLM(pretrained=tiny_llama.model, tokenizer=tiny_llama.tokenizer, batch_size=1)
    inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    theirs = hf.loglikelihood(inst, disable_tqdm=True)
    ours = tiny_llama.loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    text = "Now is the winter of our discontent made glorious summer by this sun of York. " * 3
    (r_theirs,) = hf.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    (r_ours,) = tiny_llama.loglikelihood_rolling([text])
    assert r_ours == pytest.approx(r_theirs, abs=1e-3)


def test_bookkeeping_is_not_a_metric_and_directions_come_from_the_harness_or_the_name():
    results = {
        "results": {
            "piqa": {"alias": "piqa", "acc,none": 0.6, "acc_stderr,none": 0.02, "sample_len": 100},
            "wikitext": {"word_perplexity,none": 30.0, "bits_per_byte,none": 1.1, "sample_len": 62},
        },
        "higher_is_better": {"piqa": {"acc": True}},
    }
    metrics = adapter.metrics_of(results)
    assert set(metrics) == {"piqa/acc", "wikitext/word_perplexity", "wikitext/bits_per_byte"}
    assert metrics["piqa/acc"].higher_is_better and metrics["piqa/acc"].spread == {"stderr": 0.02}
    assert not metrics["wikitext/word_perplexity"].higher_is_better
    assert not metrics["wikitext/bits_per_byte"].higher_is_better
    assert adapter.bookkeeping(results) == {"piqa": {"sample_len": 100}, "wikitext": {"sample_len": 62}}
