"""Triton kernels for the hot paths, each beside its pure-torch reference and a dispatcher that runs the
kernel on CUDA tensors and the reference otherwise (so CPU machines take the same code paths).

- `kernels.hamming_topk`: `hamming_topk(queries, codes, k)`: packed binary codes (uint8, dim/8 bytes),
  XOR + popcount + per-query top-k streamed over the codes; sorted, lower row first on ties, padded
  with index -1 when k exceeds the number of codes.
- `kernels.ape_attention`: `ape_attention(...)`: APE query/decoding attention (passage group with
  temperature T and padding mask, causal prefix/query group, merged with scaling factor S in float32),
  grouped-query attention; the generator's APE mode calls it.
- `kernels.kv_dequant`: `kv_dequant(...)`: the int8 KV codec's dequantisation (per-channel key scales,
  per-token value scales) in one pass into the attention layout; `decode_kv` uses it when the
  destination cache is on a GPU.

Every dispatcher takes `backend="auto" | "torch" | "triton"`; Triton on CPU tensors needs its
interpreter (`TRITON_INTERPRET=1` before triton is imported). Each file also has a `benchmark()`
that `benchmarks/kernels.py` runs.
"""
