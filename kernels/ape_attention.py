"""APE query/decoding attention: the pure-torch reference and the dispatcher the generator calls.

Shapes: query (B, H, Q, D); key/value (B, Hkv, N, D), H a multiple of Hkv (grouped-query attention).
Cache slots `[c_start, c_end)` are the passages (group C: non-causal, temperature T, padded slots
masked by `c_valid`); the rest is the prefix and the query/generated tail (group O: causal). The two
groups are merged with weights softmax([S*T*LSE_C, LSE_O]) computed in float32.
"""

from __future__ import annotations

import torch


def ape_attention_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    c_start: int,
    c_end: int,
    temperature: float,
    scale: float,
    scaling: float,
    c_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference APE attention. query (B, H, Q, D); key/value (B, Hkv, N, D) with H a multiple of
    Hkv (grouped-query attention). The last Q cache slots are the query tokens themselves. Returns
    (B, H, Q, D) in the query's dtype; all softmax statistics are computed in float32."""
    b, h, q_len, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} KV heads")
    if not 0 <= c_start <= c_end <= n - q_len:
        raise ValueError(
            f"passage slots [{c_start}, {c_end}) do not fit a cache of {n} with {q_len} new tokens"
        )
    rep = h // hkv
    # Group query heads by their KV head instead of repeating K and V.
    qf = query.float().reshape(b, hkv, rep * q_len, d)
    kf, vf = key.float(), value.float()
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scaling  # (B, Hkv, rep*Q, N)

    # O group: prefix slots and the tail (query + generated), causal over the tail.
    tail = n - c_end
    s_o = torch.cat([scores[..., :c_start], scores[..., c_end:]], dim=-1)
    v_o = torch.cat([vf[:, :, :c_start], vf[:, :, c_end:]], dim=2)
    q_pos = torch.arange(q_len, device=query.device) + (tail - q_len)  # index of each query in the tail
    k_pos = torch.arange(tail, device=query.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (Q, tail)
    allowed = torch.cat([causal.new_ones(q_len, c_start), causal], dim=1).repeat(rep, 1)
    s_o = s_o.masked_fill(~allowed, float("-inf"))
    lse_o = torch.logsumexp(s_o, dim=-1, keepdim=True)
    out_o = torch.matmul(torch.exp(s_o - lse_o), v_o)

    if c_end == c_start:
        return out_o.reshape(b, h, q_len, d).to(query.dtype)

    s_c = scores[..., c_start:c_end] / temperature
    if c_valid is not None:
        s_c = s_c.masked_fill(~c_valid[:, None, None, :].to(torch.bool), float("-inf"))
    lse_c = torch.logsumexp(s_c, dim=-1, keepdim=True)
    safe_c = torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c))
    out_c = torch.matmul(torch.exp(s_c - safe_c), vf[:, :, c_start:c_end])

    # softmax([S*T*LSE_C, LSE_O]); an empty (fully padded) passage group gets weight 0.
    a = scale * temperature * lse_c
    w_c = torch.sigmoid(a - lse_o)
    w_c = torch.where(torch.isfinite(lse_c), w_c, torch.zeros_like(w_c))
    out = w_c * out_c + (1.0 - w_c) * out_o
    return out.reshape(b, h, q_len, d).to(query.dtype)


def ape_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    c_start: int,
    c_end: int,
    temperature: float,
    scale: float,
    scaling: float,
    c_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatcher: the torch reference on CPU (and wherever no faster kernel applies)."""
    return ape_attention_torch(
        query,
        key,
        value,
        c_start=c_start,
        c_end=c_end,
        temperature=temperature,
        scale=scale,
        scaling=scaling,
        c_valid=c_valid,
    )
