"""Attention, the one operation that lets a position read from others: softmax(q kᵀ / sqrt(d)) v.

Vaswani et al. 2017, eq. 1, with several heads (Sec. 3.2.2). ``attend`` is the
arithmetic; the blocks that use it are

- ``SelfAttention``: an image's positions attend to each other (the U-Net's
  low resolutions, Dhariwal & Nichol 2021);
- ``CrossAttention``: an image's positions (the queries) read the tokens of a
  prompt (the keys and values), the way the U-Nets of latent diffusion models
  are steered by text (Rombach et al. 2022, Sec. 3.3):

      Attention(Q, K, V) = softmax(Q Kᵀ / sqrt(d)) V,
      Q = W_Q · norm(image features),  K = W_K · tokens,  V = W_V · tokens;

- the text encoder's layers (``diffusion.text_encoder``), tokens attending to
  tokens.

Padding tokens carry no meaning, so a key mask gives them no weight: the
result is the same whatever padding a prompt has (the tests check it). Both
image blocks add their output to their input through a projection that starts
at zero, so a freshly built block is the identity.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


def attend(q, k, v, key_mask=None):
    """softmax(q kᵀ / sqrt(d)) v per head: q (B, Lq, heads, d), k and v (B, Lk, heads, d) -> (B, Lq, heads, d).

    key_mask (B, Lk), True where a key may be attended to; each query needs at
    least one. The logits and softmax are float32 whatever the inputs' dtype.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v), weights


def heads(x, num_heads: int):
    """(B, L, C) -> (B, L, num_heads, C / num_heads)."""
    B, L, C = x.shape
    return x.reshape(B, L, num_heads, C // num_heads)


class Context(NamedTuple):
    """What the text encoder gives the U-Net: per-token features (B, L, D), which tokens are real (B, L), and one
    pooled vector per prompt (B, D)."""

    tokens: jax.Array
    mask: jax.Array
    pooled: jax.Array


class SelfAttention(nnx.Module):
    """Multi-head self-attention over the H×W positions of GroupNorm-ed features, with a residual connection."""

    def __init__(self, channels, *, num_heads, norm, dtype, rngs):
        self.num_heads, self.norm = num_heads, norm
        self.qkv = nnx.Linear(channels, 3 * channels, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(channels, channels, dtype=dtype, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x):
        B, H, W, C = x.shape
        q, k, v = jnp.split(heads(self.qkv(self.norm(x)).reshape(B, H * W, 3 * C), 3 * self.num_heads), 3, axis=2)
        return x + self.out(attend(q, k, v)[0].reshape(B, H, W, C))


class CrossAttention(nnx.Module):
    """The image's positions attend to a prompt's tokens (Rombach et al. 2022, Sec. 3.3), with a residual connection.

    ``keep_weights = True`` makes each call keep its attention weights,
    (B, heads, H·W, L), as ``self.weights`` (an ``nnx.Intermediate``), for the
    attention maps of the notebooks.
    """

    def __init__(self, channels, context_dim, *, num_heads, norm, dtype, rngs):
        self.num_heads, self.norm, self.keep_weights = num_heads, norm, False
        self.q = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.kv = nnx.Linear(context_dim, 2 * channels, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(channels, channels, dtype=dtype, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x, context: Context):
        B, H, W, C = x.shape
        q = heads(self.q(self.norm(x)).reshape(B, H * W, C), self.num_heads)
        k, v = jnp.split(heads(self.kv(context.tokens), 2 * self.num_heads), 2, axis=2)
        h, weights = attend(q, k, v, context.mask)
        if self.keep_weights:
            self.weights = nnx.Intermediate(weights)
        return x + self.out(h.reshape(B, H, W, C))
