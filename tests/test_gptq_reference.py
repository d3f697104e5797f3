"""GPTQ's column loop against a re-implementation of IST-DASLab's ``fasterquant``.

The re-implementation below follows the reference's loop line by line (dead columns, static
groups, act-order permutation, damping after it, inverse-Hessian Cholesky, lazy blocks, and a
dynamic group's grid read from ``W[:, (i1+i):(i1+i+groupsize)]``, the matrix as of the block
start), on this library's grid (find_params / quantize), which is shared by every quantizer.
With ``stale=False`` it reads the group's columns from the block being updated instead: what
``group_grid: updated`` (the behaviour before version 2) does.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from slimbench.methods.quantization import gptq
from slimbench.methods.quantization.grid import dequantize, find_params, quantize


def fasterquant(w, h, bits, groupsize, blocksize, actorder, static_groups, percdamp=0.01, stale=True):
    W, H = w.clone().float(), h.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [find_params(W[:, i : i + groupsize], bits, False) for i in range(0, columns, groupsize)]
    perm = torch.arange(columns)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    p = find_params(W, bits, False)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w_col, d = W1[:, i], Hinv1[i, i]
            if groupsize is not None:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        src = W[:, (i1 + i) : (i1 + i + groupsize)] if stale else \
                            torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :groupsize]
                        p = find_params(src, bits, False)
                else:
                    p = groups[int(perm[i1 + i]) // groupsize]
            q = dequantize(quantize(w_col.unsqueeze(1), p), p).flatten()
            Q[:, i1 + i] = q
            err1 = (w_col - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q[:, torch.argsort(perm)]


def layer(seed: int, rows: int = 24, cols: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight and the Hessian of correlated inputs with uneven channel scales.

    H is rounded to multiples of 1/64 (plus 4·I so it stays positive definite): its diagonal's
    mean is then exact in any summation order. The reference damps after the act-order
    permutation and gptq.py before it; with an exact mean both add the very same damping, so the
    comparison below can be bitwise. The diagonal is made tie-free for the same reason (argsort).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    x = x * (0.2 + 2 * torch.rand(cols, generator=g))
    h = torch.round(2 * x.t() @ x / 256 * 64) / 64
    h = (h + h.t()) / 2 + 4 * torch.eye(cols)
    h[range(cols), range(cols)] += torch.randperm(cols, generator=g) / 1024
    assert torch.diag(h).unique().numel() == cols
    return torch.randn(rows, cols, generator=g), h


CASES = [  # (group_size, block_size, act_order, static_groups): groups start inside blocks unless noted
    (16, 40, False, False), (16, 40, True, False), (32, 48, True, False), (16, 128, False, False),
    (32, 32, True, False),  # every group starts at a block start: both semantics agree
    (16, 40, False, True), (16, 40, True, True), (None, 40, False, False), (None, 40, True, False),
]


@pytest.mark.parametrize(("gs", "bs", "act_order", "static"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_default_is_the_reference_loop(gs, bs, act_order, static, seed):
    w, h = layer(seed)
    cfg = gptq.GPTQConfig(bits=3, group_size=gs, block_size=bs, act_order=act_order, static_groups=static)
    assert cfg.group_grid == "reference"
    ref = fasterquant(w, h, 3, gs, bs, act_order, static)
    assert torch.equal(gptq.gptq_quantize(w, h, cfg).weight, ref)


@pytest.mark.parametrize(("gs", "bs", "act_order"), [(16, 40, False), (16, 40, True), (32, 48, True), (16, 128, False)])
def test_updated_option_reads_the_block_being_updated(gs, bs, act_order):
    w, h = layer(3)
    cfg = gptq.GPTQConfig(bits=3, group_size=gs, block_size=bs, act_order=act_order, group_grid="updated")
    res = gptq.gptq_quantize(w, h, cfg)
    assert torch.equal(res.weight, fasterquant(w, h, 3, gs, bs, act_order, False, stale=False))
    # ... which is not the reference: the test tells the two semantics apart
    assert not torch.equal(res.weight, fasterquant(w, h, 3, gs, bs, act_order, False))


VERSION_1_CHECKSUMS = [4120.0, 3963.0, 4463.0, 4536.0, 4194.0, 4255.0]  # from the version-1 code


def test_updated_option_keeps_the_codes_of_version_1():
    """Codes of version 1 (group grids from the updated block), recorded from that code on this
    layer: 3 bits, groups of 8, blocks of 12, act-order; a checksum of the codes per row."""
    w, h = layer(7, rows=6, cols=48)
    cfg = gptq.GPTQConfig(bits=3, group_size=8, block_size=12, act_order=True, group_grid="updated")
    codes = gptq.gptq_quantize(w, h, cfg).codes
    weights = torch.arange(1, 49, dtype=torch.float64)
    assert (codes.double() @ weights).tolist() == VERSION_1_CHECKSUMS


def test_updated_needs_dynamic_groups():
    with pytest.raises(ValueError, match="dynamic groups"):
        gptq.GPTQConfig(group_grid="updated")
    with pytest.raises(ValueError, match="dynamic groups"):
        gptq.GPTQConfig(group_size=32, act_order=True, static_groups=True, group_grid="updated")


@pytest.mark.parametrize(("gs", "act_order"), list(itertools.product([None, 16], [False, True])))
def test_identity_hessian_is_still_rtn_with_either_grid(gs, act_order):
    from slimbench.methods.quantization.grid import quantize_matrix

    w = torch.randn(8, 64)
    for grid in ("reference", "updated") if gs else ("reference",):
        cfg = gptq.GPTQConfig(bits=3, group_size=gs, act_order=act_order, block_size=24, group_grid=grid)
        assert torch.equal(gptq.gptq_quantize(w, torch.eye(64), cfg).weight, quantize_matrix(w, cfg)[1])
