"""Tiny models for export and engine tests: a Llama with a small byte-level BPE vocabulary.

Readers of GGUF files (the gguf library, transformers, llama.cpp) parse every vocabulary entry;
with GPT-2's 50k tokens that alone takes tens of seconds on the shared CI cores, so these tests
use a 320-token BPE trained on a Shakespeare play in well under a second (seeded, deterministic).
"""

from __future__ import annotations

import functools

import torch

from slimbench.specs import HardwareSpec


@functools.lru_cache(maxsize=1)
def small_bpe_tokenizer(vocab: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slimbench.zoo.corpora import shakespeare_documents

    text = shakespeare_documents("calibration")[0][1][:40000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_bpe_llama(seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    """A random Llama (by default hidden 64, 4 heads, 2 KV heads, MLP 2 x hidden) over the small BPE
    vocabulary."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slimbench.zoo.models import wrap

    tok = small_bpe_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    prov = {"source": f"random init, tiny Llama over a {len(tok)}-token BPE (seed {seed})", "weights": "random"}
    return wrap(model, tok, "tiny-bpe-llama", HardwareSpec(threads=1), prov)


def shakespeare_ids(lm, n: int) -> torch.Tensor:
    from slimbench.zoo.corpora import encode_split

    return torch.tensor([encode_split(lm, "shakespeare", "test")[:n]])
