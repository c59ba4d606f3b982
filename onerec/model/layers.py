"""Building blocks shared by OneRec V1 and V2, top to bottom: norm -> attention -> FFN -> MoE.

Every fast path has its plain reference beside it, selected by a `reference` attribute on the
module (`model.set_reference(True)` flips them all); tests/unit/test_model.py compares the two.

Shapes: B batch, T query tokens, S key tokens, D d_model, H query heads, Hkv key/value heads
(GQA: H % Hkv == 0, query head h reads kv head h // (H // Hkv)), hd head size, E experts.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

def dropout_layer(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity when p == 0: an eval-mode Dropout is a no-op that still
    costs a module call, and beam search calls ~30 of them per step."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


# --------------------------------------------------------------------------- norm


class RMSNorm(nn.Module):
    """x / rms(x) * weight (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


# --------------------------------------------------------------------------- attention


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           causal: bool = False, dropout_p: float = 0.0, reference: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + masks) v.

    q (B, H, T, hd); k, v (B, Hkv, S, hd); mask: bool broadcastable to (B, H, T, S), True = may
    attend; causal: query i sees keys 0..i (top-left aligned, so T == S). Every query row must
    keep at least one key (a fully masked row gives NaN on both paths). Returns (B, H, T, hd).
    """
    rep = q.shape[1] // k.shape[1]
    if causal and mask is not None:  # SDPA takes one or the other: fold causal into the mask
        t, s = q.shape[2], k.shape[2]
        mask = mask & torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        causal = False
    if not reference and q.shape[2] == 1 and mask is None and not causal and dropout_p == 0 and k.shape[2] <= 16:
        return _one_query(q, k, v)
    if not reference:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=causal, enable_gqa=rep > 1)
    k = k.repeat_interleave(rep, dim=1)                                   # (B, H, S, hd)
    v = v.repeat_interleave(rep, dim=1)                                   # (B, H, S, hd)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])              # (B, H, T, S)
    if causal:
        t, s = att.shape[-2:]
        att = att.masked_fill(~torch.ones(t, s, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.dropout(att.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
    return att @ v                                                        # (B, H, T, hd)


def _one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`attend` for one query over a few keys (a beam-search step reading its KV cache) as
    broadcast multiply-sums: SDPA's per-(row, head) setup dominates there (2x slower at 640 rows,
    4 keys, on CPU). q (B, H, 1, hd); k, v (B, Hkv, S, hd) -> (B, H, 1, hd)."""
    b, h, _, hd = q.shape
    hkv = k.shape[1]
    q = q.view(b, hkv, h // hkv, 1, hd)                                   # (B, Hkv, rep, 1, hd)
    att = ((q * k[:, :, None]).sum(-1) / math.sqrt(hd)).softmax(-1)       # (B, Hkv, rep, S)
    return (att[..., None] * v[:, :, None]).sum(-2).view(b, h, 1, hd)


class KVProjection(nn.Module):
    """x (B, S, D) -> k, v each (B, Hkv, S, hd)."""

    def __init__(self, d_model: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.proj = nn.Linear(d_model, 2 * n_kv_heads * head_dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = x.shape
        kv = self.proj(x).view(b, s, 2, self.n_kv_heads, self.head_dim)   # (B, S, 2, Hkv, hd)
        k, v = kv.permute(2, 0, 3, 1, 4)                                  # 2 x (B, Hkv, S, hd)
        return k, v


class KVCache:
    """Decoder self-attention keys/values of the tokens decoded so far, one (k, v) per layer.

    Beam search calls `reorder(parent)` after each step so every beam keeps its own history.
    """

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def length(self, layer: int = 0) -> int:
        return 0 if self.k[layer] is None else self.k[layer].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, Hkv, T, hd); return the whole history (B, Hkv, S + T, hd) each."""
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B',) of the batch, e.g. the parent beam of each surviving beam."""
        self.k = [None if k is None else k.index_select(0, index) for k in self.k]
        self.v = [None if v is None else v.index_select(0, index) for v in self.v]


class SelfAttention(nn.Module):
    """Multi-head self-attention with GQA; causal (decoder, optional KV cache) or with a key
    padding mask (encoder)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, dropout: float = 0.0,
                 causal: bool = True):
        super().__init__()
        assert d_model % n_heads == 0 and n_heads % n_kv_heads == 0
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.causal, self.dropout = causal, dropout
        self.reference = False
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = KVProjection(d_model, n_kv_heads, self.head_dim)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.resid_drop = dropout_layer(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, T, D); key_mask (B, T) True = real token; cache: earlier tokens' k/v (causal only)."""
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k, v = self.kv(x)                                                      # (B, Hkv, T, hd)
        start = 0
        if cache is not None:
            start = cache.length(layer)
            k, v = cache.update(layer, k, v)                                   # (B, Hkv, S, hd)
        mask, causal = None, self.causal
        if key_mask is not None:
            mask = key_mask[:, None, None, :]                                  # (B, 1, 1, S)
        if causal and start > 0:  # queries sit at start..start+T-1: causal relative to the cache
            causal = False
            if t > 1:
                s = start + t
                pos = torch.arange(start, s, device=x.device)
                rel = torch.arange(s, device=x.device)[None, :] <= pos[:, None]  # (T, S)
                mask = rel if mask is None else mask & rel
        y = attend(q, k, v, mask, causal, self.dropout if self.training else 0.0, self.reference)
        y = y.transpose(1, 2).reshape(b, t, d)                                 # (B, T, D)
        return self.resid_drop(self.out(y))


class CrossAttention(nn.Module):
    """Queries from x attend to keys/values computed elsewhere (per layer in V1, shared in V2)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, d_model // n_heads, dropout
        self.reference = False
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.resid_drop = dropout_layer(dropout)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D); k, v (B', Hkv, S, hd) and key_mask (B', S) (True = real context token)
        with B = B' * g: query rows r*g .. r*g + g-1 (a user's g beams or candidates) all read
        key row r, as g*T queries of one attention call, so the context is never copied per beam."""
        b, t, d = x.shape
        g = b // k.shape[0]
        if g * k.shape[0] != b:
            raise ValueError(f"{b} query rows do not divide into groups over {k.shape[0]} key rows")
        q = self.q(x).view(b // g, g * t, self.n_heads, self.head_dim).transpose(1, 2)  # (B', H, g*T, hd)
        mask = None if key_mask is None else key_mask[:, None, None, :]        # (B', 1, 1, S)
        y = attend(q, k, v, mask, False, self.dropout if self.training else 0.0, self.reference)
        return self.resid_drop(self.out(y.transpose(1, 2).reshape(b, t, d)))   # (B, T, D)


# --------------------------------------------------------------------------- feed-forward


def _activate(x_in: torch.Tensor, x_gate: torch.Tensor | None) -> torch.Tensor:
    """SwiGLU when a gate branch exists (silu(gate) * in), else GELU."""
    return F.gelu(x_in) if x_gate is None else F.silu(x_gate) * x_in


class FeedForward(nn.Module):
    """Dense FFN, SwiGLU or GELU; returns (out, aux=0) like MoE so blocks treat both alike."""

    def __init__(self, d_model: int, hidden: int, activation: str = "swiglu", dropout: float = 0.0):
        super().__init__()
        assert activation in ("swiglu", "gelu"), activation
        self.w_in = nn.Linear(d_model, hidden, bias=False)
        self.w_gate = nn.Linear(d_model, hidden, bias=False) if activation == "swiglu" else None
        self.w_out = nn.Linear(hidden, d_model, bias=False)
        self.drop = dropout_layer(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = None if self.w_gate is None else self.w_gate(x)
        return self.drop(self.w_out(_activate(self.w_in(x), gate))), x.new_zeros(())


class MoE(nn.Module):
    """Top-k mixture of experts (Switch/GShard style).

    router: softmax over E experts; each token goes to its top-k experts, weighted by their
    probabilities renormalized to sum to 1. Load-balance loss = E * sum_e f_e * P_e with
    f_e = share of the N*k (token, expert) assignments sent to e and P_e = mean router
    probability of e (1.0 when perfectly balanced). Every token is counted (no padding mask).

    Fast path: assignments sorted by expert, then per expert one gather, its matmuls on exactly
    its tokens and one index_add (no capacity limit: no token is ever dropped).
    Reference: a loop over tokens and their k experts.
    """

    def __init__(self, d_model: int, hidden: int, n_experts: int, top_k: int,
                 activation: str = "swiglu", dropout: float = 0.0):
        super().__init__()
        assert activation in ("swiglu", "gelu"), activation
        assert 1 <= top_k <= n_experts
        self.n_experts, self.top_k = n_experts, top_k
        self.reference = False
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, hidden))     # (E, D, Hf)
        swiglu = activation == "swiglu"
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, hidden)) if swiglu else None
        self.w_out = nn.Parameter(torch.empty(n_experts, hidden, d_model))    # (E, Hf, D)
        for w in (self.w_in, self.w_gate, self.w_out):
            if w is not None:
                nn.init.normal_(w, std=0.02)
        self.drop = dropout_layer(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (out (B, T, D), load-balance loss ())."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                       # (N, D)
        probs = self.router(flat).float().softmax(dim=-1)                     # (N, E)
        top_p, expert = probs.topk(self.top_k, dim=-1)                        # (N, k) each
        if self.reference:
            out, aux = self._reference(flat, probs, _renormalized(top_p, x.dtype), expert)
        elif self.training or torch.is_grad_enabled():
            out, aux = self._dispatch(flat, top_p, expert), self._balance_loss(probs, expert)
        else:                                     # inference: the balance loss trains nothing
            out, aux = self._dispatch(flat, top_p, expert), probs.new_zeros(())
        return self.drop(out).view(shape), aux

    def _balance_loss(self, probs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(expert.reshape(-1), minlength=self.n_experts)  # (E,)
        fraction = counts.to(probs.dtype) / expert.numel()                     # (E,) f_e
        return self.n_experts * (fraction * probs.mean(dim=0)).sum()

    def _dispatch(self, x: torch.Tensor, top_p: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """Each expert runs on exactly its own tokens (one stable sort groups them, one gather
        and one split hand each expert its rows) and the weighted outputs are added back. No
        (E, C, D) buffer padded to the busiest expert: routers are skewed (at inference one expert
        often takes half the tokens, so padding doubled the FLOPs), and the padded scatter/gather
        cost 4x this loop at 640 tokens on CPU. x (N, D); top_p, expert (N, k) -> (N, D)."""
        expert = expert.reshape(-1)                                           # (N*k,) assignment a: token a // k
        order = expert.argsort(stable=True)                                   # (N*k,) grouped by expert
        counts = torch.bincount(expert, minlength=self.n_experts).tolist()    # (E,) one host sync
        token = order // self.top_k                                           # (N*k,) each assignment's token
        grouped = x.index_select(0, token).split(counts)                      # E x (C_e, D)
        y = torch.cat([self._expert(e, x_e) for e, x_e in enumerate(grouped) if len(x_e)])  # (N*k, D)
        if self.top_k > 1:   # top-1's renormalized gate p / p is exactly 1 (and has no gradient)
            y = y * _renormalized(top_p, x.dtype).reshape(-1)[order, None]
        return torch.zeros_like(x).index_add(0, token, y)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's FFN: x (C, D) -> (C, D)."""
        h_gate = None if self.w_gate is None else x @ self.w_gate[e]
        return _activate(x @ self.w_in[e], h_gate) @ self.w_out[e]

    def _reference(self, x, probs, gate, expert):
        n, d = x.shape
        out = x.new_zeros(n, d)
        counts = [0] * self.n_experts
        for i in range(n):
            for j in range(self.top_k):
                e = int(expert[i, j])
                counts[e] += 1
                out[i] += gate[i, j] * self._expert(e, x[i:i + 1])[0]
        aux = probs.new_zeros(())
        for e in range(self.n_experts):
            aux = aux + (counts[e] / (n * self.top_k)) * probs[:, e].mean()
        return out, self.n_experts * aux


def _renormalized(top_p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, k) probabilities of each token's top-k experts -> gates that sum to 1 per token."""
    return (top_p / top_p.sum(dim=-1, keepdim=True)).to(dtype)


def build_ffn(d_model: int, hidden: int, n_experts: int, top_k: int, activation: str,
              dropout: float) -> nn.Module:
    """Dense FFN when n_experts == 0, else MoE; both return (out, aux)."""
    if n_experts == 0:
        return FeedForward(d_model, hidden, activation, dropout)
    return MoE(d_model, hidden, n_experts, top_k, activation, dropout)
