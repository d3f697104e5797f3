"""Hostile suite files and names: one clear error before any work, and no name posing as another.

The suite files run through the real CLI in a child process whose address space is capped
(3 GiB), so a regression that tries to expand an alias bomb fails this test instead of the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import fabricate as fb
import pytest

from slimbench.report.write import write_report
from slimbench.sweep.store import ResultStore

# One test worker for the file (make test runs pytest-xdist with --dist loadgroup): its tests share
# the module's one subprocess that meets every hostile file, which each worker would run again.
pytestmark = pytest.mark.xdist_group("test_hostile_input")
ROOT = Path(__file__).resolve().parent.parent
GOOD = "models: [tiny-llama]\nmethods: [baseline]\ntasks: [{name: perplexity, seqlen: 32, max_windows: 2}]\n"


def billion_laughs() -> str:
    text = "a: &a [" + ", ".join(['"lol"'] * 9) + "]\n"
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    return text  # *i stands for 9**9 = 387,420,489 strings


REST = "\nmethods: [baseline]\ntasks: [perplexity]\n"


def hostile_files(folder: Path) -> dict[str, Path]:
    bomb = billion_laughs()
    files = {
        "bomb at the top level": bomb + "models: *i\nmethods: [baseline]\ntasks: [perplexity]\n",
        "bomb in a parameter": bomb + "models: [tiny-llama]\nmethods: [{name: rtn, bits: *i}]\ntasks: [perplexity]\n",
        "50 MB list": "models: [" + ", ".join(["tiny-llama"] * 4_200_000) + "]" + REST,
        "100,000-deep list": "models: " + "[" * 100_000 + "]" * 100_000 + REST,
        "recursive alias": "models: &r [tiny-llama, *r]\nmethods: [baseline]\ntasks: [perplexity]\n",
        "a name of half a megabyte": f"models: [{'m' * 500_000}]\nmethods: [baseline]\ntasks: [perplexity]\n",
        "a 100,000-value grid": "models: [tiny-llama]\nmethods: [{name: rtn, bits: ["
        + ", ".join(["4"] * 20_000)
        + "], group_size: [32, 64, 128, 256, 512]}]\ntasks: [perplexity]\n",
    }
    out = {}
    for i, (what, text) in enumerate(files.items()):
        out[what] = folder / f"hostile{i}.yaml"
        out[what].write_text(text)
    out["UTF-16"] = folder / "utf16.yaml"
    out["UTF-16"].write_bytes(GOOD.encode("utf-16"))
    out["UTF-16 without a byte-order mark"] = folder / "utf16le.yaml"
    out["UTF-16 without a byte-order mark"].write_bytes(GOOD.encode("utf-16-le"))
    out["Latin-1"] = folder / "latin1.yaml"
    out["Latin-1"].write_bytes(("# café au lait\n" + GOOD).encode("latin-1"))
    return out


CHILD = """
import contextlib, io, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
sys.path.insert(0, {root!r})
import benchmark
out = {{}}
for what, args in json.loads(sys.argv[1]).items():
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            rc = benchmark.main(args)
        except BaseException as exc:  # what a user would see as a traceback
            rc = f"raised {{type(exc).__name__}}"
    out[what] = {{"rc": rc, "err": err.getvalue(), "out": std.getvalue()}}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    files = hostile_files(folder)
    calls = {what: ["validate", str(path)] for what, path in files.items()}
    calls["run: bomb at the top level"] = ["run", str(files["bomb at the top level"]), "--results", str(folder / "r")]
    calls["run: --set with an alias bomb"] = [
        "run",
        str(folder / "good.yaml"),
        "--results",
        str(folder / "r2"),
        "--set",
        "methods=" + "[*a]" * 1,
    ]
    (folder / "good.yaml").write_text(GOOD)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT)), json.dumps(calls)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=folder,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), folder, files


EXPECT = {
    "bomb at the top level": "more than 100,000 values",
    "bomb in a parameter": "more than 100,000 values",
    "50 MB list": "at most 1,048,576 bytes",
    "100,000-deep list": "nested more than 32 deep",
    "recursive alias": "used inside itself",
    "a name of half a megabyte": "unknown model",
    "a 100,000-value grid": "at most 1,000 per entry",
    "UTF-16": "UTF-16",
    "UTF-16 without a byte-order mark": "NUL byte",
    "Latin-1": "line 1, column 6: byte 0xe9 is not UTF-8",
}


@pytest.mark.parametrize("what", list(EXPECT))
def test_hostile_suite_file_gives_one_clear_error(outcomes, what):
    results, _, files = outcomes
    r = results[what]
    assert r["rc"] == 2, r
    assert "Traceback" not in r["err"] + r["out"] and "Error:" not in r["err"].replace("error:", "")
    assert r["err"].startswith(f"error: {files[what]}") and r["err"].count("error:") == 1, r["err"][:500]
    assert EXPECT[what] in r["err"], r["err"][:500]
    assert len(r["err"]) < 3000  # values cut short in the message


def test_run_writes_nothing_for_a_hostile_file(outcomes):
    results, folder, _ = outcomes
    for what in ("run: bomb at the top level", "run: --set with an alias bomb"):
        assert results[what]["rc"] == 2 and "Traceback" not in results[what]["err"], results[what]
    assert "alias *'a' is undefined" in results["run: --set with an alias bomb"]["err"]
    assert not (folder / "r").exists() and not (folder / "r2").exists()


def test_the_limits_are_stated_in_the_docs():
    from slimbench.sweep import yaml_limits

    readme = (ROOT / "README.md").read_text()
    for limit in (f"{yaml_limits.MAX_BYTES:,}", "1 MiB", f"{yaml_limits.MAX_VALUES:,}", f"{yaml_limits.MAX_DEPTH}"):
        assert limit in readme, limit


# -- names that pose as other names -------------------------------------------------------------------
RLO, ZWSP = "\u202e", "\u200b"


def test_invisible_characters_are_written_out_in_every_format():
    from slimbench.report.escape import csv_text, html_name, latex_text, md_text, reveal

    name = f"rtn{RLO}8-tib{ZWSP}"
    for text in (reveal(name), md_text(name), str(csv_text(name)), latex_text(name), html_name(name)):
        assert RLO not in text and ZWSP not in text
    assert reveal(name) == "rtn<U+202E>8-tib<U+200B>"
    assert "U+202E" in html_name(name) and html_name(name).startswith("<bdi>")
    assert reveal("gemma-3-270m") == "gemma-3-270m" and reveal("é ü 中文") == "é ü 中文"  # visible text stays


def test_a_name_with_bidi_or_zero_width_characters_cannot_pose_as_another(tmp_path):
    store = ResultStore(tmp_path / "r")
    spoof_model = f"tiny-llama{ZWSP}"  # looks like tiny-llama
    spoof_method = fb.method(f"base{RLO}enil", label=f"base{RLO}enil")  # shows as "baseline" reversed
    recs = [
        fb.ppl_record("tiny-llama", fb.method("baseline"), [2.0] * 4),
        fb.ppl_record(spoof_model, fb.method("baseline"), [2.0] * 4),
        fb.ppl_record("tiny-llama", spoof_method, [2.1] * 4),
    ]
    fb.write(store, recs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = write_report(store, tmp_path / "rep", html=True, plots=True)
    texts = {p.name: p.read_text() for p in out.files if p.suffix in (".md", ".csv", ".tex", ".html")}
    texts["console"] = out.summary
    for where, text in texts.items():
        assert RLO not in text and ZWSP not in text, where
        assert "U+202E" in text and "U+200B" in text, where
    assert "tiny-llama<U+200B>" in out.summary
