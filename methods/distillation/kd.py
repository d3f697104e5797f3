"""Distillation losses and the on-disk teacher-output cache (no METHOD here).

Teacher outputs are kept as the top-k logits per position plus the log-partition at the
distillation temperature: full logits (vocab 49k-262k floats per token) would take gigabytes
for a few tens of thousands of tokens. The KL is taken over k+1 bins, the teacher's top-k
tokens and one "rest" bin holding the remaining probability of each distribution. It is exactly
zero when student and teacher agree, never exceeds the full-vocabulary KL (merging bins cannot
increase a KL), and equals it when k is the vocabulary size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from slimbench.config import stable_hash


@dataclass
class TeacherTopK:
    """Per position: top-k raw logits and their token ids, and logsumexp(logits / T)."""

    values: torch.Tensor  # [N, S, k] float32
    indices: torch.Tensor  # [N, S, k] int64
    lse: torch.Tensor  # [N, S] float32

    def batch(self, rows: torch.Tensor) -> TeacherTopK:
        return TeacherTopK(self.values[rows], self.indices[rows], self.lse[rows])


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and very negative x."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_kl(student_logits: torch.Tensor, teacher: TeacherTopK, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) over top-k + rest bins at temperature T."""
    logp_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    logp_s_k = logp_s.gather(-1, teacher.indices)
    logp_t_k = teacher.values / temperature - teacher.lse.unsqueeze(-1)
    p_t_k = logp_t_k.exp()
    kl_k = (p_t_k * (logp_t_k - logp_s_k)).sum(-1)
    log_rest_t = _log1mexp(torch.logsumexp(logp_t_k, -1))
    log_rest_s = _log1mexp(torch.logsumexp(logp_s_k, -1))
    p_rest_t = log_rest_t.exp()
    # A rest bin of (numerically) zero teacher mass contributes nothing (0 log 0 = 0).
    kl_rest = torch.where(p_rest_t > 1e-9, p_rest_t * (log_rest_t - log_rest_s), torch.zeros_like(p_rest_t))
    return (kl_k + kl_rest).mean()


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` [B, S-1, V] (positions 0..S-2) against ids[:, 1:]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def hidden_cosine(student_h: list[torch.Tensor], teacher_h: list[torch.Tensor]) -> torch.Tensor:
    """Mean over matched layers and positions of 1 - cos(student, teacher hidden state)."""
    pairs = zip(student_h, teacher_h, strict=True)
    losses = [1 - F.cosine_similarity(s.float(), t.float(), dim=-1).mean() for s, t in pairs]
    return torch.stack(losses).mean()


# -- the cache -----------------------------------------------------------------------------
def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of tensors (identifies a teacher or data)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    return tensor_digest(dict(model.state_dict()))


@torch.no_grad()
def teacher_topk(teacher: nn.Module, ids: torch.Tensor, k: int, temperature: float, batch: int, device) -> TeacherTopK:
    """Run the teacher on every sequence once; keep top-k logits of positions 0..S-2."""
    vals, idxs, lses = [], [], []
    for start in range(0, len(ids), batch):
        logits = teacher(input_ids=ids[start : start + batch].to(device), use_cache=False).logits[:, :-1].float()
        top = logits.topk(min(k, logits.shape[-1]), dim=-1)
        vals.append(top.values.cpu())
        idxs.append(top.indices.cpu())
        lses.append(torch.logsumexp(logits / temperature, -1).cpu())
    return TeacherTopK(torch.cat(vals), torch.cat(idxs), torch.cat(lses))


def cached_teacher_topk(
    teacher: nn.Module, ids: torch.Tensor, k: int, temperature: float, batch: int, device, folder: Path,
    teacher_digest: str | None = None,
) -> tuple[TeacherTopK, dict]:
    """Teacher top-k outputs from ``folder`` if computed before for the same teacher, data, k, T.

    The key hashes the teacher's weights and the token ids (not names), so every student
    distilled from the same teacher on the same data reuses one file. Written atomically.
    """
    teacher_digest = teacher_digest or model_digest(teacher)
    key = stable_hash({"teacher": teacher_digest, "data": tensor_digest({"ids": ids}), "k": k, "T": temperature})
    path = folder / f"teacher-top{k}-{key}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return TeacherTopK(t["values"], t["indices"], t["lse"]), {"key": key, "hit": True, "path": str(path)}
    out = teacher_topk(teacher, ids, k, temperature, batch, device)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"values": out.values, "indices": out.indices, "lse": out.lse}, str(tmp))
    os.replace(tmp, path)
    return out, {"key": key, "hit": False, "path": str(path)}
