"""The text encoder, and the U-Net that reads a prompt through it.

Image tools encode a prompt with a pretrained Transformer (CLIP's text tower
in Stable Diffusion: 12 layers, width 768) and hand its per-token outputs to
the U-Net's cross-attention (Rombach et al. 2022, Sec. 3.3). Here the encoder
is small and trained jointly with the U-Net from scratch, on captions of the
digits (``diffusion.captions``):

    token ids (B, L) ── token embedding + position embedding
                     ── num_layers × Transformer layer (pre-LayerNorm:
                          h + attention(LN h), then h + MLP(LN h))
                     ── LayerNorm ── tokens (B, L, width) ── cross-attention keys and values
                                        └─ mean over the real tokens: pooled (B, width)
                                           ── added to the U-Net's time embedding

Attention is bidirectional (every token sees every other, as in BERT; CLIP
masks it causally and pools its last token), and padding tokens are masked
out as keys, so a prompt means the same whatever its padding.

``TextUNet`` is the whole model of a text run: ``model(x, t, ids)`` encodes
the prompts and denoises, so the samplers and guidance see it as any other
denoiser, its condition being the token ids. Guidance doubles the batch with
the ids of the empty or the negative prompt. ``cross_attention_maps`` shows
where in the image each word of a prompt is read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion.attention import Context, CrossAttention, attend, heads
from diffusion.errors import ConfigError, InputError, check_whole
from diffusion.tokenizer import EMPTY, PAD_ID
from diffusion.unet import COMPUTE_DTYPES, UNet, UNetConfig


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """The text encoder's settings: vocabulary size, padded prompt length, width, layers and heads."""

    vocab_size: int
    max_tokens: int
    width: int = 32
    num_layers: int = 2
    num_heads: int = 2
    compute_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "max_tokens", "width", "num_layers", "num_heads"):
            check_whole(name if name != "width" else "text_width", getattr(self, name), 1, ConfigError)
        if self.width % self.num_heads:
            raise ConfigError(f"text_heads={self.num_heads} does not divide text_width={self.width}")


class TransformerLayer(nnx.Module):
    """h + attention(LN h), then h + MLP(LN h): a pre-LayerNorm Transformer layer (Vaswani et al. 2017; Xiong et
    al. 2020 for the placement of the norms), its MLP 4× wide with GELU."""

    def __init__(self, width, num_heads, *, dtype, rngs):
        self.num_heads = num_heads
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.mlp1 = nnx.Linear(width, 4 * width, dtype=dtype, rngs=rngs)
        self.mlp2 = nnx.Linear(4 * width, width, dtype=dtype, rngs=rngs)

    def __call__(self, h, mask):
        B, L, D = h.shape
        q, k, v = jnp.split(heads(self.qkv(self.norm1(h)), 3 * self.num_heads), 3, axis=2)
        h = h + self.proj(attend(q, k, v, mask)[0].reshape(B, L, D))
        return h + self.mlp2(nnx.gelu(self.mlp1(self.norm2(h))))


class TextEncoder(nnx.Module):
    """Token ids (B, L) -> ``Context``: per-token features, the mask of real tokens, and their mean."""

    def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        dtype = COMPUTE_DTYPES[c.compute_dtype]
        self.token_emb = nnx.Embed(c.vocab_size, c.width, rngs=rngs)
        self.position_emb = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (c.max_tokens, c.width)))
        self.layers = nnx.List(
            [TransformerLayer(c.width, c.num_heads, dtype=dtype, rngs=rngs) for _ in range(c.num_layers)]
        )
        self.norm = nnx.LayerNorm(c.width, rngs=rngs)

    def __call__(self, ids) -> Context:
        ids = jnp.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] != self.config.max_tokens:
            raise InputError(f"token ids have shape (B, {self.config.max_tokens}); got {ids.shape}")
        mask = ids != PAD_ID
        h = self.token_emb(ids) + self.position_emb[...][None]
        for layer in self.layers:
            h = layer(h, mask)
        tokens = self.norm(h).astype(jnp.float32)
        weights = mask[..., None].astype(jnp.float32)
        pooled = (tokens * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
        return Context(tokens, mask, pooled)


class TextUNet(nnx.Module):
    """A U-Net steered by a prompt: ``model(x, t, ids)`` with ids (B, L) from ``diffusion.tokenizer``.

    ``ids=None`` is the empty prompt. The U-Net's ``context_dim`` is the
    encoder's width.
    """

    def __init__(self, unet: UNetConfig, text: TextEncoderConfig, vocabulary: tuple[str, ...], *, rngs: nnx.Rngs):
        self.text_encoder = TextEncoder(text, rngs=rngs)
        self.unet = UNet(dataclasses.replace(unet, context_dim=text.width), rngs=rngs)
        self.parameterization = unet.parameterization
        self.empty_id = vocabulary.index(EMPTY)
        self.max_tokens = text.max_tokens

    def __call__(self, x, t, ids=None, *, dropout_key=None):
        if ids is None:
            ids = jnp.zeros((x.shape[0], self.max_tokens), jnp.int32).at[:, 0].set(self.empty_id)
        return self.unet(x, t, context=self.text_encoder(ids), dropout_key=dropout_key)


def cross_attention_maps(model: TextUNet, x, t, ids) -> np.ndarray:
    """Where the image reads each token: (B, L, H, W), the attention weights of every cross-attention block
    averaged over its heads, resized to the image's size and averaged over the blocks.

    At every position the weights over the tokens sum to 1 (padding gets 0).
    One eager call of the model; x (B, H, W, C), t (B,), ids (B, L).
    """
    blocks = [node for _, node in nnx.iter_graph(model) if isinstance(node, CrossAttention)]
    B, H, W, _ = x.shape
    for block in blocks:
        block.keep_weights = True
    try:
        model(x, t, ids)
        maps = []
        for block in blocks:
            weights = block.weights[...].mean(axis=1)  # (B, positions, L)
            side = int(round(weights.shape[1] ** 0.5))
            grid = weights.reshape(B, side, side, -1)
            maps.append(jax.image.resize(grid, (B, H, W, grid.shape[-1]), "linear"))
    finally:
        for block in blocks:
            block.keep_weights = False
            del block.weights
    return np.asarray(jnp.mean(jnp.stack(maps), axis=0)).transpose(0, 3, 1, 2)
