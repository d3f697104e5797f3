"""The online paper-reproduction path, end to end, against a Hub-compatible server on loopback.

`benchmark.py reproduce gptq --budget paper` as an online user runs it (only `HF_HUB_OFFLINE=0`
set, a fresh `HF_HOME`): the paper's models downloaded at their pinned revisions, WikiText-2 and
a C4 shard loaded by config, file and split through `datasets`, the headline's cells run, the
report printed. The server (tests/hub_server.py) serves git repositories built by
tests/hub_repos.py under the real repository names; everything runs inside a network namespace
that has only loopback (tests/online_driver.py). The paper files are the shipped ones, copied
and shrunk to a tiny budget (windows of 64 tokens, 4 calibration samples; claim cards on tiny
models); the revisions are redirected to the fixture's commits with `--set`, the data sets'
with `$SLIMBENCH_REVISION_<CORPUS>`, as a user would.

The scenarios run in one process, in order (the Hugging Face cache carries over, as on a
user's machine): a revision that does not exist; the server going away in the middle of the
weights; a data-set config that does not exist at the pinned revision; the full GPTQ headline;
a dry run after one record is lost; the rerun that measures it again; SmoothQuant (a
Llama-shaped model in sharded safetensors; its card calibrates on WikiText-2's training split).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import hub_repos  # noqa: E402
from netns import loopback_namespace_problem  # noqa: E402

MISSING_REVISION = "feedfacefeedfacefeedfacefeedfacefeedface"
# One test worker for the file (make test runs pytest-xdist with --dist loadgroup): every test reads
# the one online run of the module's fixture, which each worker would otherwise run again.
pytestmark = pytest.mark.xdist_group("test_online")


def shrink(paper: str, out: Path, claim_model: str, claim_calib: str) -> Path:
    """The shipped paper file at a tiny budget: its published numbers, models and protocol kept."""
    raw = yaml.safe_load((ROOT / "configs" / "papers" / f"{paper}.yaml").read_text())
    head = raw["headline"]["suite"]
    head["hardware"]["threads"] = 1
    for task in head["tasks"]:
        task["seqlen"] = 64
    for m in head["methods"]:
        if isinstance(m, dict) and "calib_samples" in m:
            m.update(calib_samples=4, calib_seqlen=64)
    claim = raw["claim"]
    claim["suite"]["models"] = [claim_model]
    claim["suite"]["tasks"] = [{"name": "perplexity", "corpus": "wikitext2", "split": "test", "seqlen": 32}]
    claim["suite"]["hardware"]["threads"] = 1
    claim["budgets"]["paper"] = {"methods": {"calib_samples": 4, "calib_seqlen": 32, "calib_corpus": claim_calib},
                                 "tasks": {"max_windows": 2}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{paper}.yaml"  # the file name is the paper's key
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    why = loopback_namespace_problem()
    if why:
        pytest.skip(f"online tests run in a loopback-only network namespace: {why}")
    work = tmp_path_factory.mktemp("online")
    fx = hub_repos.build(work / "hub")
    gptq = shrink("gptq", work / "papers", "tiny-opt", "c4")
    smoothquant = shrink("smoothquant", work / "papers", "tiny-llama", "wikitext2")
    pins = [f"headline.suite.models.0.revision={fx.opt125m_pinned}", f"headline.suite.models.1.revision={fx.opt350m}"]
    sets = [a for p in pins for a in ("--set", p)]
    data_env = {"SLIMBENCH_REVISION_WIKITEXT2": fx.wikitext, "SLIMBENCH_REVISION_C4": fx.c4}

    from slimbench.reproduce import papers as rp

    paper = rp.load_paper(str(gptq), pins)
    cells = rp.headline_cells(paper, rp.headline_suite(paper))
    lost = cells[2]  # OPT-125M, GPTQ 4-bit: the record a dry run will find missing

    def reproduce(path, results, *extra):
        return ["reproduce", str(path), "--budget", "paper", "--no-progress", "--results", str(work / results), *extra]

    plan = [
        {"name": "bad-revision", "env": data_env,
         "argv": reproduce(gptq, "r-bad-revision", "--set", f"headline.suite.models.0.revision={MISSING_REVISION}",
                           "--set", f"headline.suite.models.1.revision={fx.opt350m}")},
        {"name": "dry-bad-revision", "env": data_env,
         "argv": reproduce(gptq, "r-dry-bad-revision", "--dry-run", "--set",
                           f"headline.suite.models.0.revision={MISSING_REVISION}",
                           "--set", f"headline.suite.models.1.revision={fx.opt350m}")},
        {"name": "gone", "env": data_env, "drop_after": {"pytorch_model.bin": 1_000_000},
         "argv": reproduce(gptq, "r-gone", *sets)},
        {"name": "bad-config", "env": {**data_env, "SLIMBENCH_REVISION_WIKITEXT2": fx.wikitext_without_wt2},
         "argv": reproduce(gptq, "r-bad-config", *sets)},
        {"name": "gptq", "env": data_env, "argv": reproduce(gptq, "r-gptq", *sets)},
        {"name": "dry-run", "env": data_env, "remove": [str(work / "r-gptq" / "runs" / f"{lost.run_id}.json")],
         "argv": reproduce(gptq, "r-gptq", *sets, "--dry-run")},
        {"name": "rerun", "env": data_env, "argv": reproduce(gptq, "r-gptq", *sets)},
        {"name": "smoothquant", "env": data_env,
         "argv": reproduce(smoothquant, "r-smoothquant", "--set", f"headline.suite.models.0.revision={fx.llama}")},
    ]
    (work / "plan.json").write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SLIMBENCH_REVISION_"))}
    env.update(HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="0")  # what an online user sets; nothing else
    cmd = [sys.executable, str(ROOT / "tests" / "online_driver.py"), "--repos", str(fx.root),
           "--plan", str(work / "plan.json"), "--out", str(work / "out.json")]
    proc = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *cmd],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcome = {s["name"]: s for s in json.loads((work / "out.json").read_text())}
    return {"work": work, "fx": fx, "out": outcome, "lost": lost, "gptq_cells": cells}


def show(step: dict) -> str:
    return f"rc={step['rc']}\n--- stdout\n{step['stdout'][-3000:]}\n--- stderr\n{step['stderr'][-3000:]}"


def errors(step: dict) -> list[str]:
    return [line for line in step["stderr"].splitlines() if line.startswith("error:")]


def nothing_recorded(results: Path) -> bool:
    return not any(results.glob("runs/*.json")) and not any(results.glob("reproduce/*"))


def hub_paths(step: dict, repo: str) -> list[str]:
    return [r.split(" ", 2)[1] for r in step["requests"] if f"/{repo}/" in r]


def revision_in(path: str) -> str | None:
    """The revision a request names: /{repo}/resolve/REV/..., /api/{type}/{repo}/(revision|tree)/REV."""
    m = re.search(r"/(?:resolve|revision|tree|paths-info)/([^/?]+)", path)
    return m.group(1) if m else None


# -- the headline, online ------------------------------------------------------------------------
def test_gptq_headline_runs_online_and_prints_published_vs_measured(online):
    step = online["out"]["gptq"]
    assert step["rc"] == 1, show(step)  # random weights miss every published number: exit 1, not a crash
    assert errors(step) == [], show(step)
    report = json.loads((online["work"] / "r-gptq" / "reproduce" / "gptq-paper.json").read_text())
    head = report["headline"]
    assert head["ran"] and head["missing"] == [] and head["unmeasured"] == []
    rows = head["rows"]
    published = yaml.safe_load((ROOT / "configs" / "papers" / "gptq.yaml").read_text())["headline"]["published"]
    assert [(r["model"], r["published"]) for r in rows] == [(p["model"], p["value"]) for p in published]
    for r in rows:  # every published cell measured, compared with its tolerance, and given a verdict
        assert isinstance(r["measured"], float) and math.isfinite(r["measured"])
        assert r["status"] in ("pass", "FAIL")
        assert r["status"] == ("pass" if abs(r["measured"] - r["published"]) <= float(r["tolerance"].strip("±%"))
                                / 100 * r["published"] else "FAIL")
    assert head["measured"] == 10 and head["within_tolerance"] == sum(r["status"] == "pass" for r in rows)
    # The printed report: one line per published number, published beside measured.
    table = [line for line in step["stdout"].splitlines() if line.startswith("| facebook/opt-")]
    assert len(table) == 10
    assert "| 27.65 |" in table[0] and "| 1,300 |" in table[3] and "| 33.79 |" in table[9]
    assert report["claim"]["verdict"] in ("holds", "fails", "inconclusive")  # on a random tiny model


def test_the_pinned_revision_is_what_was_downloaded_and_measured(online):
    fx, work = online["fx"], online["work"]
    requested = [p for s in online["out"].values() for p in hub_paths(s, "facebook/opt-125m")]
    assert requested, "the model was never requested from the server"
    revisions = {revision_in(p) for p in requested if not p.startswith("/cdn/")}
    assert revisions <= {fx.opt125m_pinned, MISSING_REVISION}, revisions  # never main, never its commit
    # What was fetched, as announced: the pinned commit's config, tokenizer and weight files.
    tree = subprocess.run(["git", "-C", str(fx.root / "models" / "facebook" / "opt-125m"), "ls-tree", "-r", "-l",
                           fx.opt125m_pinned], capture_output=True, text=True, check=True).stdout.splitlines()
    sizes = {line.split("\t")[1]: int(line.split()[3]) for line in tree}
    fetched = sum(v for k, v in sizes.items() if k not in ("README.md", ".gitattributes"))
    line = f"fetching facebook/opt-125m at {fx.opt125m_pinned} ({len(sizes) - 2} files, {fetched / 1e6:,.1f} MB)"
    assert line in online["out"]["gptq"]["stdout"], online["out"]["gptq"]["stdout"][:500]
    cache = work / "hf" / "hub" / "models--facebook--opt-125m"
    assert sorted(p.name for p in (cache / "snapshots").iterdir()) == [fx.opt125m_pinned]
    assert not (cache / "refs" / "main").exists()
    # The record says which commit transformers loaded, and the number is that commit's.
    baseline = online["gptq_cells"][0]
    assert (baseline.model.name, baseline.method.name) == ("facebook/opt-125m", "baseline")
    rec = json.loads((work / "r-gptq" / "runs" / f"{baseline.run_id}.json").read_text())
    assert rec["model"]["revision"] == fx.opt125m_pinned
    assert rec["model"]["provenance"]["commit"] == fx.opt125m_pinned
    measured = rec["metrics"]["perplexity"]["value"]
    pinned, main = (reference_perplexity(fx, rev) for rev in (fx.opt125m_pinned, fx.opt125m_main))
    assert measured == pytest.approx(pinned, rel=1e-5)
    assert abs(pinned - main) > 1e-3 * pinned  # the two commits differ measurably


def reference_perplexity(fx, commit: str) -> float:
    """The concat-windows perplexity of a commit of the fixture's OPT-125M on the fixture's
    WikiText-2 test split, computed here without SlimBench: the weights read from git, the
    tokenizer built from the repository's own vocab.json / merges.txt, windows of 64."""
    import io

    import pyarrow.parquet as pq
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, OPTConfig

    repo = fx.root / "models" / "facebook" / "opt-125m"

    def blob(path: str, rev: str, repo: Path = repo) -> bytes:
        return subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], capture_output=True,
                              check=True).stdout

    vocab = json.loads(blob("vocab.json", commit))
    merges = [tuple(line.split()) for line in blob("merges.txt", commit).decode().splitlines()[1:] if line]
    tok = ByteLevelBPETokenizer(vocab, merges, add_prefix_space=False)  # GPT-2's byte-level BPE, by hand
    config = OPTConfig(**json.loads(blob("config.json", commit)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = torch.load(io.BytesIO(blob("pytorch_model.bin", commit)), weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model.tie_weights()
    model.eval()
    wt = fx.root / "datasets" / "Salesforce" / "wikitext"
    rows = pq.read_table(io.BytesIO(blob("wikitext-2-raw-v1/test-00000-of-00001.parquet", fx.wikitext, wt)))
    ids = tok.encode("\n\n".join(rows.column("text").to_pylist())).ids
    n = len(ids) // 64
    windows = torch.tensor(ids[: n * 64]).view(n, 64)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                                reduction="none").view(n, -1).double().mean(dim=1)
    return math.exp(nll.mean().item())


def test_datasets_load_by_config_file_and_split_at_their_pinned_commits(online):
    fx, work = online["fx"], online["work"]
    step = online["out"]["gptq"]
    requests = [r for s in online["out"].values() for r in s["requests"]]
    wt = f"/datasets/Salesforce/wikitext/resolve/{fx.wikitext}/wikitext-2-raw-v1/test-00000-of-00001.parquet"
    c4 = f"/datasets/allenai/c4/resolve/{fx.c4}/en/c4-train.00000-of-01024.json.gz"
    assert any(r.endswith(wt) for r in requests) and any(r.endswith(c4) for r in requests)
    # The evaluation text recorded is the fixture's: the record's data hash over its rows.
    import hashlib

    import pyarrow.parquet as pq

    table = pq.read_table(fx.root / "datasets" / "Salesforce" / "wikitext" / "wikitext-2-raw-v1" /
                          "test-00000-of-00001.parquet")
    h = hashlib.sha256()
    for i, text in enumerate(table.column("text").to_pylist()):
        h.update(f"test:{i}".encode() + b"\0" + text.encode() + b"\0")
    assert f"data wikitext2/test: {table.num_rows} documents" in step["stdout"]
    assert "data c4/calibration: 40 documents" in step["stdout"]
    cell = online["gptq_cells"][0]
    rec = json.loads((work / "r-gptq" / "runs" / f"{cell.run_id}.json").read_text())
    assert rec["task_details"]["data"]["sha256"] == h.hexdigest()
    gptq = next(c for c in online["gptq_cells"] if c.method.name == "gptq")
    calib = json.loads((work / "r-gptq" / "runs" / f"{gptq.run_id}.json").read_text())
    details = calib["method_report"]["steps"][0]["details"]["calibration"]
    assert details["corpus"] == "c4" and details["tokens"] == 4 * 64


def test_a_lost_record_is_reported_missing_and_a_rerun_measures_only_it(online):
    step, lost = online["out"]["dry-run"], online["lost"]
    assert step["rc"] == 1, show(step)  # a published number not measured is a miss
    report = json.loads((online["work"] / "r-gptq" / "reproduce" / "gptq-paper.json").read_text())
    row = next(line for line in step["stdout"].splitlines() if line.startswith("| facebook/opt-125m | gptq(4-bit"))
    assert "| 31.12 | – |" in row and "missing: not run" in row
    rerun = online["out"]["rerun"]
    assert rerun["rc"] == 1 and errors(rerun) == [], show(rerun)
    assert report["headline"]["unmeasured"] == [] and report["headline"]["measured"] == 10  # written by the rerun
    runs = [r for r in rerun["requests"] if "/resolve/" in r and r.startswith("GET")]
    assert runs == []  # everything came from the cache
    assert (online["work"] / "r-gptq" / "runs" / f"{lost.run_id}.json").exists()


def test_a_second_paper_with_another_model_family_and_calibration_corpus(online):
    fx, step = online["fx"], online["out"]["smoothquant"]
    assert step["rc"] == 1 and errors(step) == [], show(step)
    report = json.loads((online["work"] / "r-smoothquant" / "reproduce" / "smoothquant-paper.json").read_text())
    rows = report["headline"]["rows"]
    assert [(r["model"], r["published"]) for r in rows] == [("meta-llama/Llama-2-7b-hf", 5.474),
                                                            ("meta-llama/Llama-2-7b-hf", 5.515)]
    assert all(isinstance(r["measured"], float) and r["status"] in ("pass", "FAIL") for r in rows)
    snap = online["work"] / "hf" / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / fx.llama
    assert (snap / "model.safetensors.index.json").exists() and len(list(snap.glob("model-*.safetensors"))) > 1
    assert not (snap / "pytorch_model.bin").exists()  # one weight format fetched, the one transformers loads
    # Its claim card calibrates on WikiText-2's training split (the corpus' calibration split).
    arm = next(a for a in report["claim"]["arms"] if a["arm"] == "smoothquant")
    rec = json.loads((online["work"] / "r-smoothquant" / "runs" / f"{arm['run_id']}.json").read_text())
    calib = rec["method_report"]["steps"][0]["details"]["calibration"]
    assert (calib["corpus"], calib["split"], calib["tokens"]) == ("wikitext2", "calibration", 4 * 32)
    assert report["claim"]["verdict"] in ("holds", "fails", "inconclusive")


# -- one clear error, nothing recorded ----------------------------------------------------------
def test_a_revision_that_does_not_exist_is_one_clear_error(online):
    step = online["out"]["bad-revision"]
    assert step["rc"] == 2, show(step)
    assert len(errors(step)) == 1, show(step)
    assert f"facebook/opt-125m at revision {MISSING_REVISION}" in errors(step)[0]
    assert "has no revision" in errors(step)[0]
    assert nothing_recorded(online["work"] / "r-bad-revision")


def test_a_dry_run_asks_the_hub_without_downloading(online):
    step, fx = online["out"]["dry-bad-revision"], online["fx"]
    assert step["rc"] == 0 and errors(step) == [], show(step)  # a dry run reports, it does not fail
    assert "Not reachable here" in step["stdout"] and f"has no revision '{MISSING_REVISION}'" in step["stdout"]
    assert not any("/resolve/" in r or r.startswith("GET /cdn/") for r in step["requests"])  # nothing downloaded
    asked = f"GET /api/datasets/allenai/c4/revision/{fx.c4}"
    assert any(r.startswith(asked) for r in step["requests"])  # the data pins were asked about too
    assert nothing_recorded(online["work"] / "r-dry-bad-revision")
    clean = online["out"]["dry-run"]  # the dry run after the headline ran: every pin exists
    assert "Not reachable here" not in clean["stdout"], show(clean)
    assert not any("/resolve/" in r for r in clean["requests"])


def test_a_dataset_config_that_does_not_exist_is_one_clear_error(online):
    step, fx = online["out"]["bad-config"], online["fx"]
    assert step["rc"] == 2, show(step)
    assert len(errors(step)) == 1, show(step)
    line = errors(step)[0]
    assert "Salesforce/wikitext (config 'wikitext-2-raw-v1'" in line and fx.wikitext_without_wt2 in line
    assert "wikitext-103-raw-v1" in line  # what the revision does have
    assert nothing_recorded(online["work"] / "r-bad-config")


def test_a_server_that_goes_away_mid_download_is_one_clear_error_and_nothing_partial_stays(online):
    step, fx = online["out"]["gone"], online["fx"]
    assert step["server_went_away"], show(step)
    assert step["rc"] == 2, show(step)
    assert len(errors(step)) == 1, show(step)
    assert "the download stopped" in errors(step)[0] and "the same command again" in errors(step)[0]
    assert nothing_recorded(online["work"] / "r-gone")
    # No partial file in the cache: the weights are absent (not truncated), nothing is left half-written.
    opt = [f for f in step["hf_files"] if f.startswith("models--facebook--opt-125m/")]
    assert not any(f.endswith("pytorch_model.bin") or ".incomplete" in f for f in opt), opt
    # The next command (another scenario, a fresh server) downloaded them whole: the pinned commit's bytes.
    snap = online["work"] / "hf" / "hub" / "models--facebook--opt-125m" / "snapshots" / fx.opt125m_pinned
    repo = fx.root / "models" / "facebook" / "opt-125m"
    pinned = subprocess.run(["git", "-C", str(repo), "show", f"{fx.opt125m_pinned}:pytorch_model.bin"],
                            capture_output=True, check=True).stdout
    assert (snap / "pytorch_model.bin").read_bytes() == pinned


# -- the pieces, without a server --------------------------------------------------------------
@pytest.mark.parametrize(("user", "expected"), [
    ({}, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}),
    ({"HF_HUB_OFFLINE": "0"}, {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}),  # one switch for both
    ({"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "1"}),
])
def test_one_variable_turns_the_hub_on_for_models_and_data_sets(monkeypatch, user, expected):
    from slimbench.zoo.hub import offline_defaults

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DISABLE_SAFETENSORS_CONVERSION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in user.items():
        monkeypatch.setenv(key, value)
    offline_defaults()
    assert {k: os.environ[k] for k in expected} == expected
    assert os.environ["DISABLE_SAFETENSORS_CONVERSION"] == "1"  # no call to a conversion Space


def test_the_files_fetched_are_config_tokenizer_and_one_weight_format():
    from slimbench.errors import SuiteError
    from slimbench.reproduce.online import files_to_fetch

    both = ["config.json", "tokenizer.json", "README.md", "pytorch_model.bin", "model.safetensors", "tf_model.h5"]
    assert files_to_fetch("m", "r", both) == ["config.json", "tokenizer.json", "model.safetensors"]
    sharded = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "pytorch_model-00001-of-00002.bin"]
    assert files_to_fetch("m", "r", sharded)[1:] == sharded[1:4]
    assert files_to_fetch("m", "r", ["config.json", "vocab.json", "merges.txt", "pytorch_model.bin"]) == [
        "config.json", "vocab.json", "merges.txt", "pytorch_model.bin"]
    with pytest.raises(SuiteError, match="has no weights"):
        files_to_fetch("m", "r", ["config.json", "flax_model.msgpack"])


def test_set_overrides_a_paper_field_before_validation(tmp_path):
    from slimbench.errors import SuiteError
    from slimbench.reproduce import papers as rp

    paper = rp.load_paper("gptq", ["headline.suite.models.0.revision=" + "ab" * 20])
    assert rp.headline_suite(paper).models[0].revision == "ab" * 20
    with pytest.raises(SuiteError, match="no list element '5'"):
        rp.load_paper("gptq", ["headline.suite.models.5.revision=x"])


def test_the_cost_model_builds_the_papers_models_at_their_published_sizes():
    """paper_cost times random models built from the papers' shapes: they must be those models'
    sizes (OPT's model cards: 125M, 331M, 1.3B parameters), or the per-token costs are someone else's."""
    import torch

    from slimbench.devtools.paper_cost import SHAPES, build

    published = {"opt-125m": 125.2e6, "opt-350m": 331.2e6, "opt-1.3b": 1315.8e6}
    assert set(SHAPES) == set(published)
    for name, size in published.items():
        with torch.device("meta"):  # shapes only: no memory, no time
            model = build(name)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(size, rel=1e-3), name
