"""Suite parsing: grid expansion, overrides, and one clear error for each kind of bad input."""

import textwrap

import pytest

import benchmark
from slimbench.errors import SuiteError
from slimbench.sweep.suite import load_suite


def write(tmp_path, text, name="suite.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


GOOD = """
models: [tiny-llama]
methods:
  - baseline
  - {name: rtn, bits: [4, 8], group_size: 32}
  - [{name: magnitude, sparsity: 0.5}, {name: rtn, bits: 8}]
tasks:
  - {name: perplexity, seqlen: 64, max_windows: [2, 4]}
  - efficiency
hardware: {device: cpu, dtype: float32, threads: 1}
"""


def test_grid_expands_lists_and_steps(tmp_path):
    s = load_suite(write(tmp_path, GOOD))
    labels = [m.label() for m in s.methods]
    assert labels == [
        "baseline",
        "rtn(4-bit, g32)",
        "rtn(8-bit, g32)",
        "magnitude(50% sparse) + rtn(8-bit, per-channel)",
    ]
    assert [t.params.get("max_windows") for t in s.tasks] == [2, 4, None]
    assert len(s.cells()) == 4 * 3
    assert len({c.run_id for c in s.cells()}) == 12  # every cell has its own id


def test_run_id_is_stable_and_covers_params(tmp_path):
    a = load_suite(write(tmp_path, GOOD)).cells()
    b = load_suite(write(tmp_path, GOOD)).cells()
    assert [c.run_id for c in a] == [c.run_id for c in b]
    c = load_suite(write(tmp_path, GOOD), ["hardware.threads=2"]).cells()
    assert not {x.run_id for x in a} & {x.run_id for x in c}


def test_overrides(tmp_path):
    s = load_suite(write(tmp_path, GOOD), ["tasks.1.repeats=2", "models=[tiny-opt]", "tasks[0].seqlen=32"])
    assert s.models[0].name == "tiny-opt"
    assert s.tasks[-1].params["repeats"] == 2
    assert s.tasks[0].params["seqlen"] == 32


BAD = [
    (
        "methods: [baseline]\nmodels: [tiny-llama]\ntasks: [perplexity]\nhardware: {threads: 1}\nextra: 1\n",
        "unknown key",
    ),
    (
        "models: [tiny-llama]\nmethods: [magnitud]\ntasks: [perplexity]\n",
        "methods[0].name: unknown method 'magnitud'. Did you mean 'magnitude'",
    ),
    (
        "models: [tiny-llama]\nmethods: [{name: magnitude, sparsity: 1.5}]\ntasks: [perplexity]\n",
        "methods[0] (magnitude): sparsity: Input should be less than 1",
    ),
    (
        "models: [tiny-llama]\nmethods: [{name: rtn, bits: 0}]\ntasks: [perplexity]\n",
        "bits: Input should be greater than or equal to 2",
    ),
    (
        "models: [tiny-llama]\nmethods: [{name: rtn, bits: four}]\ntasks: [perplexity]\n",
        "bits: Input should be a valid integer",
    ),
    ("models: [tiny-llama]\nmethods: [{name: rtn, bitz: 4}]\ntasks: [perplexity]\n", "bitz: unknown parameter"),
    (
        "models: [tiny-lama]\nmethods: [baseline]\ntasks: [perplexity]\n",
        "models[0]: unknown model 'tiny-lama'. Did you mean 'tiny-llama'",
    ),
    ("models: [./no/such/folder]\nmethods: [baseline]\ntasks: [perplexity]\n", "no model folder"),
    ("models: [tiny-llama]\nmethods: [baseline]\ntasks: [perplexit]\n", "unknown task 'perplexit'"),
    (
        "models: [tiny-llama]\nmethods: [baseline]\ntasks: [{name: perplexity, split: train}]\n",
        "tasks[0].split: unknown split 'train'",
    ),
    (
        "models: [tiny-llama]\nmethods: [baseline]\ntasks: [{name: perplexity, corpus: wikitxt}]\n",
        "unknown corpus 'wikitxt'",
    ),
    ("models: [tiny-llama]\nmethods: [baseline]\ntasks: [perplexity]\nhardware: {dtype: int8}\n", "hardware: dtype"),
    ("models: [tiny-llama]\nmethods: []\ntasks: [perplexity]\n", "methods: must be a non-empty list"),
    ("models: [tiny-llama\nmethods: [baseline]\n", "malformed YAML"),
    ("- just a list\n", "a suite is a mapping"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_suite_gives_one_clear_error(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    assert str(path) in str(e.value)  # names the file
    assert message in str(e.value)


def test_cuda_requested_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SuiteError, match="CUDA is not available"):
        load_suite(
            write(
                tmp_path, "models: [tiny-llama]\nmethods: [baseline]\ntasks: [perplexity]\nhardware: {device: cuda}\n"
            )
        )


def test_missing_file():
    with pytest.raises(SuiteError, match="suite file not found"):
        load_suite("configs/does-not-exist.yaml")


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    path = write(tmp_path, "models: [tiny-llama]\nmethods: [{name: magnitude, sparsity: 1.5}]\ntasks: [perplexity]\n")
    results = tmp_path / "results"
    code = benchmark.main(["run", str(path), "--results", str(results)])
    assert code == 2
    assert not results.exists()
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "sparsity" in err


def test_bad_override_is_reported(tmp_path):
    with pytest.raises(SuiteError, match="no list element"):
        load_suite(write(tmp_path, GOOD), ["tasks.7.seqlen=3"])


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in sorted(Path(benchmark.__file__).parent.glob("configs/*.yaml")):
        assert load_suite(path).cells(), path
