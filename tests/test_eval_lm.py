"""The evaluation interface of LanguageModel and the multiple-choice engine, against independent computations."""

from __future__ import annotations

import pytest
import torch
from slimbench.tasks import multiple_choice as mc

TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that loured upon our house in the deep bosom of the ocean buried."
)


def reference_ll(lm, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """log p(cont | ctx) and greedy flag from one unbatched full forward (token_nll / logits)."""
    inp = torch.tensor([(ctx + cont)[-(lm.max_length + 1):][:-1]])
    logp = torch.log_softmax(lm.logits(inp)[0, -len(cont):].double(), dim=-1)
    target = torch.tensor(cont)
    ll = logp.gather(1, target[:, None]).sum().item()
    return ll, bool((logp.argmax(-1) == target).all())


def test_encode_pair_whole_moves_trailing_space_and_splits_the_whole_encoding(tiny_llama):
    lm = tiny_llama
    ctx, cont = lm.encode_pair("The cat sat on the ", "mat")
    assert ctx == lm.encode("The cat sat on the")
    assert ctx + cont == lm.encode("The cat sat on the mat")
    assert cont == lm.encode(" mat")
    sep_ctx, sep_cont = lm.encode_pair("The cat sat on the", "mat", mode="separate")
    assert (sep_ctx, sep_cont) == (lm.encode("The cat sat on the"), lm.encode("mat"))
    assert lm.encode_pair("", "hello") == ([lm.prefix_token_id], lm.encode("hello"))
    with pytest.raises(ValueError, match="non-empty continuation"):
        lm.encode_pair("context", "")


def requests():
    shared = "To be, or not to be, that is the"
    return [
        (shared, " question"),
        (shared, " answer to everything in the world"),
        ("Friends, Romans, countrymen,", " lend me your ears"),
        (shared, " end"),
        ("", "Once upon a time"),
        ("A horse! a horse!", " My kingdom for a horse!"),
    ]


@pytest.mark.parametrize("share", [True, False])
def test_loglikelihood_matches_unbatched_full_forward(tiny_lm, share):
    lm = tiny_lm
    got = lm.loglikelihood(requests(), batch_size=3, share_context=share)
    for (c, x), (ll, greedy) in zip(requests(), got, strict=True):
        ref_ll, ref_greedy = reference_ll(lm, *lm.encode_pair(c, x))
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_is_greedy_true_for_the_models_own_greedy_continuation(tiny_llama):
    lm = tiny_llama
    ctx = lm.encode(TEXT[:60])
    gen = lm.greedy(torch.tensor([ctx]), 4)[0].tolist()
    (ll, greedy), (_, other) = lm.loglikelihood_tokens([(ctx, gen), (ctx, [gen[0], (gen[1] + 1) % 50000])])
    assert greedy and not other and ll < 0


def test_long_inputs_are_cut_from_the_left_like_the_harness(tiny_llama):
    lm = tiny_llama
    lm.model.config.max_position_embeddings = 48  # rotary positions: only our truncation reads it
    ctx = (lm.encode(TEXT) * 40)[: lm.max_length + 20]
    conts = [lm.encode(" and so"), lm.encode(" the end of it")]
    got = lm.loglikelihood_tokens([(ctx, c) for c in conts], batch_size=2)  # too long to share a context
    for c, (ll, _) in zip(conts, got, strict=True):
        ref_ll, _ = reference_ll(lm, ctx, c)
        assert ll == pytest.approx(ref_ll, abs=1e-4)


def test_loglikelihood_rolling_scores_every_token_once(tiny_llama):
    lm = tiny_llama
    ids = lm.encode(TEXT)
    (short,) = lm.loglikelihood_rolling([TEXT])
    full = torch.tensor([[lm.prefix_token_id, *ids]])
    assert short == pytest.approx(-lm.token_nll(full).double().sum().item(), abs=1e-4)
    # windows of 8: the harness' get_rolling_token_windows(context_len=1) + make_disjoint_window
    L, expected, done = 8, 0.0, 0
    expected -= lm.token_nll(torch.tensor([[lm.prefix_token_id, *ids[:L]]])).double().sum().item()
    done = L
    while done < len(ids):
        end = min(done + L, len(ids))
        inp = torch.tensor([ids[end - L - 1 : end]])  # L inputs, predicting the last end-done tokens
        expected -= lm.token_nll(inp)[0, -(end - done):].double().sum().item()
        done = end
    windows = lm.rolling_windows(ids, L)
    assert sum(len(c) for _, c in windows) == len(ids)
    assert [t for _, c in windows for t in c] == ids
    (rolled,) = lm.loglikelihood_rolling([TEXT], max_length=L)
    assert rolled == pytest.approx(expected, abs=1e-4)


def test_generate_until_is_greedy_and_stops_at_the_stop_string(tiny_llama):
    lm = tiny_llama
    ctx = lm.encode(TEXT[:50])
    tokens = lm.greedy(torch.tensor([ctx]), 12)[0].tolist()
    full = lm.decode_ids(tokens)
    assert lm.generate_until(TEXT[:50], until=(), max_new_tokens=12) == full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = lm.generate_until(TEXT[:50], until=[stop], max_new_tokens=12)
    assert cut == full[: full.index(stop)]


def test_next_token_logits_is_the_last_position(tiny_lm):
    ids = torch.tensor([tiny_lm.encode(TEXT[:40])])
    assert torch.allclose(tiny_lm.next_token_logits(ids), tiny_lm.logits(ids)[:, -1].float())


def test_embed_pools_only_real_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from slimbench.lm import LanguageModel

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "to", "be", "or", "not", "that", "is", "the", "question"]
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = BertTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    lm = LanguageModel(model, tok, name="tiny-bert")
    texts = ["to be", "or not to be that is the question"]
    both = lm.embed(texts)
    alone = lm.embed(texts[:1])
    assert both.shape == (2, 32)
    assert torch.allclose(both.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(both[0], alone[0], atol=1e-5)  # padding in the batch does not leak in


def mc_examples():
    return [
        mc.Example.from_choices("a", "The king said that the", ["queen", "horse was fast", "end", "cat"], 1),
        mc.Example.from_choices("b", "Friends, Romans,", ["countrymen", "lend me", "a"], 0),
        mc.Example("c", (("I went to the", " shop today"), ("We went to the", " shop today")), (11, 11), 1),
        mc.Example.from_choices("d", "", ["Once", "Twice upon a time"], 0),
    ]


def test_mc_engine_matches_the_plain_loop(tiny_lm):
    fast = mc.score(tiny_lm, mc_examples(), batch_size=3)
    plain = mc.score_plain(tiny_lm, mc_examples())
    assert fast.ids == plain.ids
    for a, b in zip(fast.loglikelihoods, plain.loglikelihoods, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert fast.is_greedy == plain.is_greedy
    assert (fast.acc, fast.acc_norm) == (plain.acc, plain.acc_norm)


def test_acc_norm_divides_by_choice_characters():
    lls = [[-10.0, -12.0, -3.0]]
    ex = mc.Example.from_choices("x", "ctx", ["aaaaa", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "c"], 1)
    scored = mc._decide([ex], [(v, False) for v in lls[0]])
    # acc picks -3 (choice 2); per character: -2, -0.3, -3 -> choice 1
    assert scored.acc == [0.0] and scored.acc_norm == [1.0]


def test_gold_outside_choices_is_rejected():
    with pytest.raises(ValueError, match="gold index 3"):
        mc.Example.from_choices("x", "c", ["a", "b"], 3)
