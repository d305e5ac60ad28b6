"""The denoising U-Net: the network that learns to undo the forward process.

A U-Net (Ronneberger et al. 2015) in the form diffusion models use (Ho et al.
2020, Appendix B; Dhariwal & Nichol 2021, Sec. 3):

    x ─ conv_in ─ [down level 0] ──────────────────────────── skip ─┐
                      │ downsample                                   │
                  [down level 1] ──────────────────── skip ─┐        │
                      │ downsample                          │        │
                  [down level 2] ── middle ── [up level 2] ─┘        │
                                                  │ upsample         │
                                              [up level 1] ──────────┘ ...
                                                  ── norm, SiLU, conv_out ─ prediction

- A level is ``num_res_blocks`` residual blocks (GroupNorm, SiLU, 3×3 conv,
  plus the conditioning vector; then GroupNorm, SiLU, dropout, 3×3 conv), each
  followed by self-attention when the level's resolution is listed in
  ``attention_resolutions`` (``diffusion.attention``). The middle has two
  blocks with attention between. A text model (``context_dim`` > 0) adds
  cross-attention to a prompt's tokens after every self-attention, and the
  prompt's pooled vector to the conditioning vector (Rombach et al. 2022).
- The output of each down level is concatenated onto the input of its up level
  (the skip connections that give a U-Net its name).
- The noise level enters through the conditioning vector: a sinusoidal
  embedding of the timestep (Vaswani et al. 2017, Sec. 3.5) passed through an
  MLP, plus a learned embedding of the class label, added into every block.
  Label ``num_classes`` is the extra "null" label; training replaces real labels
  by it with a small probability, so one model serves classifier-free guidance
  (Ho & Salimans 2021).
- A distilled student (``guidance_embedding``) is also given the guidance scale s
  that its teacher was guided with: w = s - 1, times ``GUIDANCE_TIME_SCALE``, is
  embedded like a timestep and added to the timestep's features through a
  bias-free linear map that starts at zero (LCM's w-embedding, Luo et al. 2023,
  Sec. 4.2; Meng et al. 2023 condition on w the same way).
- The residual branches, the attention output and the output convolution start
  at zero (Dhariwal & Nichol 2021 do the same), so at initialisation every
  block is the identity and the network predicts 0.

Time. ``t`` is a float array of shape (B,) (or a scalar). For a DDPM-style
model it is the schedule's timestep, 0 .. T-1, fractional values allowed
(sigma-space samplers need them). For a flow model (``parameterization =
"velocity"``) it is the flow time in [0, 1]; it is multiplied by 1000 before
the embedding (``FLOW_TIME_SCALE``) so that both kinds of model see their
times spread over the same range of sinusoid frequencies.

Sizes. Inputs of shape (B, H, W, C) with H = W = ``image_size``. Each level
halves the resolution, so the image is zero-padded up to a multiple of
2^(levels - 1) on entry and the output cropped back: 28×28 digits with three
levels run at 28, 14, 7; with four levels at 32, 16, 8, 4.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.attention import CrossAttention, SelfAttention
from diffusion.errors import ConfigError, InputError, check_whole, is_whole
from diffusion.forward import PARAMETERIZATIONS

FLOW_TIME_SCALE = 1000.0
GUIDANCE_TIME_SCALE = 1000.0  # w = s - 1 is multiplied by this before its sinusoidal embedding (as LCM's)
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
    """Sinusoidal embedding of (possibly fractional) times t, shape (B,) -> (B, dim).

    Half the features are cos(t * f_k), half sin(t * f_k), with frequencies
    f_k = max_period^(-k / (dim/2)) spread geometrically from 1 down to
    1 / max_period: the positional encoding of Vaswani et al. 2017, Sec. 3.5,
    used for diffusion timesteps by Ho et al. 2020 (Appendix B).
    """
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * frequencies[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def group_norm(x, scale, bias, groups: int, epsilon: float = 1e-6):
    """Group normalisation (Wu & He 2018, eqs. 1-3 and Sec. 3.1) of images x, shape (B, H, W, C).

    The C channels form ``groups`` groups of C / groups neighbours; each image's
    group is normalised by its own mean mu and variance sigma^2 over the group's
    channels and all H*W positions, then every channel gets its own affine map:

        y = scale * (x - mu) / sqrt(sigma^2 + epsilon) + bias

    Computed as Flax's ``nnx.GroupNorm`` computes it (sigma^2 = E[x^2] - mu^2, in
    float32; the tests check the two agree), but in an order that suits a CPU:
    first the per-channel sums of x and x^2 over the positions (a reduction
    over the middle axis, with the channels contiguous), then the few group
    totals from those (B, C) sums, and finally one pass y = a x + b with a
    per-image, per-channel a and b. Differentiating that order gives a
    backward pass of the same shape: two per-channel sums and one elementwise
    pass. (Reducing over a (B, H, W, groups, C / groups) view instead, the
    obvious way, ran several times slower on XLA:CPU; measured in BENCHMARKS.md.)
    """
    B, H, W, C = x.shape
    x32 = x.astype(jnp.float32)
    per_channel = functools.partial(jnp.sum, axis=(1, 2))
    # Group totals of the per-channel sums, repeated back to every channel of the group: (B, C).
    group_total = lambda sums: jnp.repeat(sums.reshape(B, groups, C // groups).sum(-1), C // groups, axis=-1)
    count = H * W * (C // groups)
    mean = group_total(per_channel(x32)) / count
    variance = jnp.maximum(group_total(per_channel(jnp.square(x32))) / count - jnp.square(mean), 0.0)
    a = scale * jax.lax.rsqrt(variance + epsilon)
    b = bias - mean * a
    return x32 * a[:, None, None, :] + b[:, None, None, :]


class GroupNorm(nnx.Module):
    """``group_norm`` with a learned per-channel ``scale`` (ones at first) and ``bias`` (zeros).

    It stands in for ``nnx.GroupNorm`` (same parameters, names and results; see
    ``group_norm`` for why), so checkpoints of either load into the other.
    """

    def __init__(self, channels: int, groups: int, *, epsilon: float = 1e-6):
        self.num_groups, self.epsilon = groups, epsilon
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x):
        return group_norm(x, self.scale[...], self.bias[...], self.num_groups, self.epsilon)


class ResBlock(nnx.Module):
    """h = skip(x) + conv(dropout(silu(norm(conv(silu(norm(x))) + W emb)))), the residual block of Ho et al. 2020.

    With ``emb_dim`` = 0 the block has no conditioning vector (the autoencoder's blocks, ``diffusion.autoencoder``).
    """

    def __init__(self, in_channels, out_channels, emb_dim, *, dropout, norm_groups, dtype, rngs):
        self.norm1 = GroupNorm(in_channels, norm_groups)
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), dtype=dtype, rngs=rngs)
        self.emb_proj = nnx.Linear(emb_dim, out_channels, dtype=dtype, rngs=rngs) if emb_dim else None
        self.norm2 = GroupNorm(out_channels, norm_groups)
        self.dropout = nnx.Dropout(dropout)
        self.conv2 = nnx.Conv(
            out_channels, out_channels, (3, 3), dtype=dtype, kernel_init=nnx.initializers.zeros, rngs=rngs
        )
        # A 1×1 convolution matches the channels of the shortcut when they change.
        self.skip = (
            nnx.Conv(in_channels, out_channels, (1, 1), dtype=dtype, rngs=rngs) if in_channels != out_channels else None
        )

    def __call__(self, x, emb=None, rngs=None):
        h = self.conv1(nnx.silu(self.norm1(x)))
        if self.emb_proj is not None:
            h = h + self.emb_proj(nnx.silu(emb))[:, None, None, :]
        h = nnx.silu(self.norm2(h))
        h = self.dropout(h, deterministic=rngs is None, rngs=rngs)
        h = self.conv2(h)
        return (x if self.skip is None else self.skip(x)) + h


class Level(nnx.Module):
    """``num_res_blocks`` residual blocks at one resolution, each optionally followed by attention."""

    def __init__(
        self,
        in_channels,
        out_channels,
        emb_dim,
        *,
        num_res_blocks,
        attention,
        num_heads,
        dropout,
        norm_groups,
        context_dim,
        dtype,
        rngs,
    ):
        common = dict(norm_groups=norm_groups, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            [
                ResBlock(in_channels if i == 0 else out_channels, out_channels, emb_dim, dropout=dropout, **common)
                for i in range(num_res_blocks)
            ]
        )
        attending = dict(num_heads=num_heads, norm_groups=norm_groups, context_dim=context_dim, dtype=dtype, rngs=rngs)
        each = range(num_res_blocks) if attention else ()
        self.attentions = nnx.List([_attention(out_channels, **attending) for _ in each])
        self.cross_attentions = nnx.List([_cross_attention(out_channels, **attending) for _ in each if context_dim])

    def __call__(self, x, emb, rngs, context=None):
        for i, block in enumerate(self.blocks):
            x = block(x, emb, rngs)
            if self.attentions:
                x = self.attentions[i](x)
            if self.cross_attentions:
                x = self.cross_attentions[i](x, context)
        return x


def _attention(channels, *, num_heads, norm_groups, context_dim, dtype, rngs):
    return SelfAttention(channels, num_heads=num_heads, norm=GroupNorm(channels, norm_groups), dtype=dtype, rngs=rngs)


def _cross_attention(channels, *, num_heads, norm_groups, context_dim, dtype, rngs):
    norm = GroupNorm(channels, norm_groups)
    return CrossAttention(channels, context_dim, num_heads=num_heads, norm=norm, dtype=dtype, rngs=rngs)


def upsample_nearest(x):
    """Nearest-neighbour ×2: every pixel becomes a 2×2 block."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Every setting of the U-Net, checked on construction (a ConfigError says what to change).

    Args:
        image_size: height = width of the inputs (28 for digits, 32 for CIFAR, 8 for a latent).
        in_channels: channels of the inputs, and of the prediction.
        channels: feature channels of the first level; level i has ``channels * channel_mult[i]``.
        channel_mult: one multiplier per level; the number of levels is its length.
        num_res_blocks: residual blocks per level, on the way down and on the way up.
        attention_resolutions: resolutions (of the padded input, halved per level) that get self-attention.
        num_heads: attention heads; must divide the channels of every level with attention.
        dropout: dropout rate inside the residual blocks (active only when ``dropout_key`` is given).
        num_classes: class labels 0 .. num_classes-1, plus the null label ``num_classes``; 0 = unconditional.
        norm_groups: GroupNorm groups; must divide every level's channels.
        parameterization: what the output means: "eps", "x0", "v" or (flow models) "velocity".
        context_dim: width of the text encoder's tokens, read by cross-attention after every
            self-attention (and a pooled vector added to the time embedding); 0 = no text.
        guidance_embedding: the network also takes a guidance scale (a distilled student,
            ``diffusion.distillation``), embedded like the timestep and added to its features.
        compute_dtype: "float32", or "bfloat16" for matmuls and convolutions on accelerators
            (parameters, normalisation and softmax stay float32).
    """

    image_size: int
    in_channels: int
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 1
    dropout: float = 0.0
    num_classes: int = 0
    norm_groups: int = 8
    parameterization: str = "eps"
    context_dim: int = 0
    guidance_embedding: bool = False
    compute_dtype: str = "float32"

    def __post_init__(self):
        for name in ("channel_mult", "attention_resolutions"):  # lists from JSON or code become tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check(self)

    @property
    def resolutions(self) -> list[int]:
        """The resolution of each level: the padded input size, halved per level."""
        size = padded_size(self.image_size, len(self.channel_mult))
        return [size // 2**i for i in range(len(self.channel_mult))]

    @property
    def widths(self) -> list[int]:
        """The feature channels of each level."""
        return [self.channels * m for m in self.channel_mult]


# The UNetConfig fields, in order, that the training config has a field of each name for; a text model's
# context_dim is its text encoder's width (diffusion.configs.TextConfig), and only a distilled student has a
# guidance embedding (diffusion.configs.DistillConfig).
UNET_FIELDS = tuple(
    f.name for f in dataclasses.fields(UNetConfig) if f.name not in ("context_dim", "guidance_embedding")
)


class UNet(nnx.Module):
    """A class-conditional denoising U-Net (see the module docstring for the layout), built from a ``UNetConfig``.

    ``rngs`` is the random initialisation, e.g. ``nnx.Rngs(0)``.
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        dtype = COMPUTE_DTYPES[c.compute_dtype]
        self.image_size, self.in_channels, self.num_classes = c.image_size, c.in_channels, c.num_classes
        self.parameterization = c.parameterization
        self.time_scale = FLOW_TIME_SCALE if c.parameterization == "velocity" else 1.0
        self.padded_size = padded_size(c.image_size, len(c.channel_mult))
        self.channels = c.channels

        emb_dim = 4 * c.channels
        self.time_mlp1 = nnx.Linear(c.channels, emb_dim, dtype=dtype, rngs=rngs)
        self.guidance_proj = (
            nnx.Linear(c.channels, c.channels, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=rngs)
            if c.guidance_embedding else None
        )
        self.time_mlp2 = nnx.Linear(emb_dim, emb_dim, dtype=dtype, rngs=rngs)
        self.label_emb = nnx.Embed(c.num_classes + 1, emb_dim, rngs=rngs) if c.num_classes else None
        self.context_dim = c.context_dim
        self.pooled_proj = nnx.Linear(c.context_dim, emb_dim, dtype=dtype, rngs=rngs) if c.context_dim else None

        common = dict(norm_groups=c.norm_groups, dtype=dtype, rngs=rngs)
        block = dict(dropout=c.dropout, **common)
        level = dict(num_res_blocks=c.num_res_blocks, num_heads=c.num_heads, context_dim=c.context_dim, **block)
        attending = dict(num_heads=c.num_heads, context_dim=c.context_dim, **common)
        widths = c.widths
        attends = [r in c.attention_resolutions for r in c.resolutions]

        self.conv_in = nnx.Conv(c.in_channels, c.channels, (3, 3), dtype=dtype, rngs=rngs)
        self.down, self.downsample = nnx.List(), nnx.List()
        previous = c.channels
        for i, width in enumerate(widths):
            self.down.append(Level(previous, width, emb_dim, attention=attends[i], **level))
            if i < len(widths) - 1:
                self.downsample.append(nnx.Conv(width, width, (3, 3), strides=2, dtype=dtype, rngs=rngs))
            previous = width

        self.mid1 = ResBlock(widths[-1], widths[-1], emb_dim, **block)
        self.mid_attention = _attention(widths[-1], **attending)
        self.mid_cross_attention = _cross_attention(widths[-1], **attending) if c.context_dim else None
        self.mid2 = ResBlock(widths[-1], widths[-1], emb_dim, **block)

        # Up levels mirror the down levels, from the lowest resolution to the
        # highest; each takes the features from below concatenated with the
        # output of its down level, and the upsampling conv adapts the width.
        self.up, self.upsample = nnx.List(), nnx.List()
        for i in reversed(range(len(widths))):
            self.up.append(Level(2 * widths[i], widths[i], emb_dim, attention=attends[i], **level))
            if i > 0:
                self.upsample.append(nnx.Conv(widths[i], widths[i - 1], (3, 3), dtype=dtype, rngs=rngs))

        self.norm_out = GroupNorm(widths[0], c.norm_groups)
        self.conv_out = nnx.Conv(
            widths[0], c.in_channels, (3, 3), dtype=dtype, kernel_init=nnx.initializers.zeros, rngs=rngs
        )

    def __call__(self, x, t, labels=None, *, context=None, guidance=None, dropout_key=None):
        """The prediction (of kind ``self.parameterization``) for noisy images x at times t.

        x: (B, H, W, C); t: (B,) or scalar floats (see the module docstring);
        labels: (B,) ints in 0 .. num_classes, None for the null label (unconditional);
        context: a prompt's ``diffusion.attention.Context`` when ``context_dim`` > 0;
        guidance: (B,) or scalar guidance scales s when ``guidance_embedding`` (a distilled student);
        dropout_key: a PRNG key during training, None (no dropout) for sampling.
        """
        B, H, W, C = x.shape
        if (H, W, C) != (self.image_size, self.image_size, self.in_channels):
            raise InputError(
                f"this U-Net takes images of shape (B, {self.image_size}, {self.image_size}, {self.in_channels}); "
                f"got {x.shape}"
            )
        if labels is not None and not self.num_classes:
            raise InputError("this U-Net is unconditional (num_classes=0); call it with labels=None")
        if (context is None) != (not self.context_dim):
            raise InputError(
                f"this U-Net reads a text context of width {self.context_dim}: pass context"
                if self.context_dim
                else "this U-Net reads no text (context_dim=0); call it with context=None"
            )

        if (guidance is None) != (self.guidance_proj is None):
            raise InputError(
                "this U-Net is a distilled student that takes the guidance scale it was distilled at: pass guidance"
                if self.guidance_proj is not None
                else "this U-Net takes no guidance scale (it is not a distilled student); call it with guidance=None"
            )

        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (B,))
        features = timestep_embedding(t * self.time_scale, self.channels)
        if self.guidance_proj is not None:
            w = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (B,)) - 1.0
            features = features + self.guidance_proj(timestep_embedding(w * GUIDANCE_TIME_SCALE, self.channels))
        emb = self.time_mlp2(nnx.silu(self.time_mlp1(features)))
        if self.label_emb is not None:
            labels = jnp.full((B,), self.num_classes) if labels is None else jnp.asarray(labels)
            emb = emb + self.label_emb(labels)
        if self.pooled_proj is not None:
            emb = emb + self.pooled_proj(context.pooled)
        # Each dropout layer draws its own key from this stream.
        rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None

        lo, hi = (self.padded_size - H) // 2, (self.padded_size - H + 1) // 2
        h = self.conv_in(jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0))))
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, emb, rngs, context)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)

        h = self.mid_attention(self.mid1(h, emb, rngs))
        if self.mid_cross_attention is not None:
            h = self.mid_cross_attention(h, context)
        h = self.mid2(h, emb, rngs)

        for i, level in enumerate(self.up):
            h = level(jnp.concatenate([h, skips.pop()], axis=-1), emb, rngs, context)
            if i < len(self.upsample):
                h = self.upsample[i](upsample_nearest(h))

        h = self.conv_out(nnx.silu(self.norm_out(h)))
        return h[:, lo : lo + H, lo : lo + W, :].astype(jnp.float32)


def padded_size(image_size: int, num_levels: int) -> int:
    """The smallest multiple of 2^(num_levels - 1) that is >= image_size: every level then halves cleanly."""
    factor = 2 ** (num_levels - 1)
    return -(-image_size // factor) * factor


def check_sizes(config, names: tuple[str, ...]) -> None:
    """Raise a ConfigError unless each field in ``names`` is a whole number >= 1 and ``channel_mult`` names at
    least one level, each a whole number >= 1 (the checks a U-Net and an autoencoder share)."""
    for name in names:
        check_whole(name, getattr(config, name), 1, ConfigError)
    if not config.channel_mult:
        raise ConfigError("channel_mult needs at least one level, e.g. (1, 2, 2)")
    for m in config.channel_mult:
        check_whole("each channel_mult entry", m, 1, ConfigError)


def _check(c: UNetConfig):
    """Raise a ConfigError that says what to change if the U-Net settings do not fit together."""
    check_sizes(c, ("image_size", "in_channels", "channels", "num_res_blocks", "num_heads", "norm_groups"))
    if not is_whole(c.context_dim, 0):
        raise ConfigError(f"context_dim must be a whole number >= 0 (got {c.context_dim!r}); 0 means no text")
    if not is_whole(c.num_classes, 0):
        raise ConfigError(f"num_classes must be a whole number >= 0 (got {c.num_classes!r}); 0 means unconditional")
    if not 0.0 <= c.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1) (got {c.dropout})")
    if c.parameterization not in PARAMETERIZATIONS or c.parameterization == "score":
        raise ConfigError(f"parameterization must be one of eps, x0, v, velocity (got {c.parameterization!r})")
    if c.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)} (got {c.compute_dtype!r})")
    resolutions = c.resolutions
    if resolutions[-1] < 2:
        raise ConfigError(
            f"{len(c.channel_mult)} levels halve a {c.image_size}×{c.image_size} input below 2×2; "
            "use fewer channel_mult entries"
        )
    unknown = [r for r in c.attention_resolutions if r not in resolutions]
    if unknown:
        raise ConfigError(
            f"attention_resolutions {unknown} match no level; for this image_size and channel_mult "
            f"the levels run at {resolutions}"
        )
    for width, resolution in zip(c.widths, resolutions):
        if width % c.norm_groups:
            raise ConfigError(
                f"norm_groups={c.norm_groups} does not divide the {width} channels at resolution {resolution}"
            )
        if resolution in c.attention_resolutions and width % c.num_heads:
            raise ConfigError(
                f"num_heads={c.num_heads} does not divide the {width} channels of the attention "
                f"at resolution {resolution}"
            )
    if c.widths[-1] % c.num_heads:
        raise ConfigError(
            f"num_heads={c.num_heads} does not divide the {c.widths[-1]} channels of the middle attention"
        )


@functools.partial(jax.jit, static_argnums=0)
def _denoise(graphdef, state, x, t, cond=None, guidance=None):
    model = nnx.merge(graphdef, state)
    return model(x, t, cond) if guidance is None else model(x, t, cond, guidance=guidance)


def as_denoiser(model: UNet):
    """The model as the samplers' denoiser: returns ``(denoiser, parameterization)``.

    ``denoiser(x, t, cond=None) -> prediction`` runs the model without dropout,
    compiled once per architecture and input shape; ``t`` is the model's time
    (a possibly fractional timestep of the schedule, or flow time in [0, 1])
    and ``cond`` the class labels (``model.num_classes`` or None for the null
    label); a distilled student's also takes ``guidance``, its guidance scale
    (``diffusion.guidance.embedded_guidance`` binds it). It is a
    ``jax.tree_util.Partial`` holding the weights as pytree leaves, so a sampler's compiled program takes them as arguments rather
    than baking them in. The parameterization says how to read the prediction.
    """
    graphdef, state = nnx.split(model)
    return jax.tree_util.Partial(_denoise, graphdef, state), model.parameterization
