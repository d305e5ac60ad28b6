"""A PyTorch twin of ``diffusion.unet.UNet`` and of the train step, for benchmarking only.

``benchmarks/bench_train.py`` times the project's JAX code against the same
network written in plain eager PyTorch (``torch.nn``), with the weights copied
across. PyTorch is not a dependency of the library; install it with
``make bench`` or ``.venv/bin/pip install -r requirements-bench.txt``.

The math is the same as ``diffusion/unet.py``, layer for layer; the places
where the two frameworks' defaults differ are spelled out:

- Layout: PyTorch convolutions take (B, C, H, W), so the twin's images are
  NCHW where the project's are NHWC.
- The stride-2 downsampling convolution: Flax's ``"SAME"`` padding of a 3×3
  kernel on an even-sized input pads 0 rows before and 1 after (the output
  grid starts on the first pixel); PyTorch's ``padding=1`` would pad 1 on both
  sides and shift the grid. The twin pads (0, 1) itself.
- GroupNorm: Flax's epsilon is 1e-6, PyTorch's default 1e-5.
- Attention: the qkv projection's output holds all the queries, then all
  the keys, then all the values, each split into consecutive heads.

``from_flax(model)`` builds the twin of an NNX U-Net and copies every weight
into it; ``TrainStep`` does the work of ``diffusion.training.train_step``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from diffusion import forward, losses

GROUPNORM_EPSILON = 1e-6  # Flax's default (nnx.GroupNorm); PyTorch's would be 1e-5


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
    """Sinusoidal embedding of times t, (B,) -> (B, dim): [cos(t f_k), sin(t f_k)] (Vaswani et al. 2017, Sec. 3.5)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """A GroupNorm with Flax's epsilon, so that both frameworks normalise alike."""
    return nn.GroupNorm(groups, channels, eps=GROUPNORM_EPSILON)


class ResBlock(nn.Module):
    """The residual block of ``diffusion.unet.ResBlock`` (Ho et al. 2020)."""

    def __init__(self, in_channels, out_channels, emb_dim, *, dropout, norm_groups):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.skip is None else self.skip(x)) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H×W positions, residual: ``diffusion.unet.Attention``."""

    def __init__(self, channels, *, num_heads, norm_groups):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x):
        B, C, H, W = x.shape
        positions = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = self.qkv(positions).view(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / sqrt(d)) v, (B, heads, H*W, d)
        h = self.out(h.transpose(1, 2).reshape(B, H * W, C))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Level(nn.Module):
    """Residual blocks at one resolution, each optionally followed by attention: ``diffusion.unet.Level``."""

    def __init__(
        self, in_channels, out_channels, emb_dim, *, num_res_blocks, attention, num_heads, dropout, norm_groups
    ):
        super().__init__()
        block = dict(dropout=dropout, norm_groups=norm_groups)
        self.blocks = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, emb_dim, **block)
            for i in range(num_res_blocks)
        )
        attentions = num_res_blocks if attention else 0
        self.attentions = nn.ModuleList(
            Attention(out_channels, num_heads=num_heads, norm_groups=norm_groups) for _ in range(attentions)
        )

    def forward(self, x, emb):
        for i, block in enumerate(self.blocks):
            x = block(x, emb)
            if self.attentions:
                x = self.attentions[i](x)
        return x


class TorchUNet(nn.Module):
    """``diffusion.unet.UNet`` in PyTorch, with the same submodule names; images (B, C, H, W).

    ``widths`` are the levels' channels, ``attends`` whether each level has
    attention; the other arguments mean what they mean for ``UNet``.
    """

    def __init__(
        self,
        *,
        image_size,
        in_channels,
        widths,
        attends,
        num_res_blocks,
        num_heads,
        dropout,
        num_classes,
        norm_groups,
        padded_size,
        time_scale,
    ):
        super().__init__()
        self.image_size, self.num_classes = image_size, num_classes
        self.padded_size, self.time_scale = padded_size, time_scale
        self.channels = widths[0]
        emb_dim = 4 * self.channels
        self.time_mlp1 = nn.Linear(self.channels, emb_dim)
        self.time_mlp2 = nn.Linear(emb_dim, emb_dim)
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        block = dict(dropout=dropout, norm_groups=norm_groups)
        level = dict(num_res_blocks=num_res_blocks, num_heads=num_heads, **block)
        self.conv_in = nn.Conv2d(in_channels, self.channels, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        previous = self.channels
        for i, width in enumerate(widths):
            self.down.append(Level(previous, width, emb_dim, attention=attends[i], **level))
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2))  # padded (0, 1) in forward
            previous = width

        self.mid1 = ResBlock(widths[-1], widths[-1], emb_dim, **block)
        self.mid_attention = Attention(widths[-1], num_heads=num_heads, norm_groups=norm_groups)
        self.mid2 = ResBlock(widths[-1], widths[-1], emb_dim, **block)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(widths))):
            self.up.append(Level(2 * widths[i], widths[i], emb_dim, attention=attends[i], **level))
            if i > 0:
                self.upsample.append(nn.Conv2d(widths[i], widths[i - 1], 3, padding=1))

        self.norm_out = group_norm(widths[0], norm_groups)
        self.conv_out = nn.Conv2d(widths[0], in_channels, 3, padding=1)

    def forward(self, x, t, labels=None):
        """The prediction for noisy images x (B, C, H, W) at times t ((B,) or scalar); labels None = the null label."""
        B, _, H, W = x.shape
        t = torch.as_tensor(t, dtype=torch.float32).broadcast_to((B,))
        emb = self.time_mlp2(F.silu(self.time_mlp1(timestep_embedding(t * self.time_scale, self.channels))))
        if self.label_emb is not None:
            labels = torch.full((B,), self.num_classes) if labels is None else torch.as_tensor(labels)
            emb = emb + self.label_emb(labels)

        lo, hi = (self.padded_size - H) // 2, (self.padded_size - H + 1) // 2
        h = self.conv_in(F.pad(x, (lo, hi, lo, hi)))
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                # Flax "SAME" for stride 2 on an even size: no row / column before, one after.
                h = self.downsample[i](F.pad(h, (0, 1, 0, 1)))

        h = self.mid2(self.mid_attention(self.mid1(h, emb)), emb)

        for i, level in enumerate(self.up):
            h = level(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2, mode="nearest"))

        h = self.conv_out(F.silu(self.norm_out(h)))
        return h[:, :, lo : lo + H, lo : lo + W]


def _torch_weight(name: str, value: np.ndarray) -> np.ndarray:
    """A Flax parameter in PyTorch's layout: conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in)."""
    if name == "kernel":
        return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return value  # biases, GroupNorm scales, embedding tables


def from_flax(model) -> TorchUNet:
    """The PyTorch twin of an NNX ``diffusion.unet.UNet``, every weight copied (float32, training mode).

    The architecture is read off the model's submodules; the weights are
    matched by path (``down.0.blocks.0.conv1.kernel`` -> ``down.0.blocks.0.conv1.weight``),
    and a parameter left unmatched on either side raises an error.
    """
    twin = TorchUNet(
        image_size=model.image_size,
        in_channels=model.in_channels,
        widths=[level.blocks[0].conv1.out_features for level in model.down],
        attends=[len(level.attentions) > 0 for level in model.down],
        num_res_blocks=len(model.down[0].blocks),
        num_heads=model.mid_attention.num_heads,
        dropout=model.down[0].blocks[0].dropout.rate,
        num_classes=model.num_classes,
        norm_groups=model.norm_out.num_groups,
        padded_size=model.padded_size,
        time_scale=model.time_scale,
    )
    renamed = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
    weights = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        *module, name = (str(part) for part in path)
        value = np.asarray(variable.get_value(), dtype=np.float32)
        weights[".".join([*module, renamed[name]])] = torch.tensor(_torch_weight(name, value))
    twin.load_state_dict(weights, strict=True)
    return twin


class TrainStep:
    """The work of ``diffusion.training.train_step`` for a DDPM-style objective (eps, x0 or v), in eager PyTorch.

    Per step: labels dropped to the null label with probability
    ``label_dropout``; t ~ Uniform{0 .. T-1}, eps ~ N(0, I), x_t = a x_0 + s eps;
    the MSE to the target of ``config.parameterization``, min-SNR weighted;
    backward; the gradient's global norm clipped to ``grad_clip``; AdamW; the
    EMA update with ``training.ema_decay_at``'s warm-up. One difference, which
    costs nothing: the learning rate is held at ``config.learning_rate`` (the
    project warms it up and decays it). Images are (B, C, H, W).
    """

    def __init__(self, model: TorchUNet, config, *, seed: int = 0):
        if config.parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"the twin trains eps, x0 or v models (got {config.parameterization!r})")
        self.model, self.config, self.steps_done = model, config, 0
        self.params = list(model.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        # fused: PyTorch's fastest AdamW kernel (the foreach one measured no different here).
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
        )
        self.generator = torch.Generator().manual_seed(seed)
        # Per-timestep tables, computed once by the project's own functions (float32, as in the JAX step).
        schedule, steps = config.noise_schedule, jnp.arange(config.num_timesteps)
        signal, noise = forward.vp_scales(schedule, steps, jnp.zeros(config.num_timesteps))
        snr = jnp.asarray(schedule.snr, jnp.float32)
        gamma = config.min_snr_gamma
        weight = losses.min_snr_weight(snr, gamma, config.parameterization) if gamma else jnp.ones_like(snr)
        self.signal_scale, self.noise_scale, self.weight = (
            torch.tensor(np.asarray(table)) for table in (signal, noise, weight)
        )

    def draw(self, x0, labels):
        """The step's random choices: (cond, t, noise) -- labels after label dropout, timesteps, Gaussian noise."""
        B, config = len(x0), self.config
        cond = None
        if config.num_classes:
            dropped = torch.rand(B, generator=self.generator) < config.label_dropout
            cond = torch.where(dropped, config.num_classes, labels)
        t = torch.randint(0, config.num_timesteps, (B,), generator=self.generator)
        noise = torch.empty_like(x0).normal_(generator=self.generator)  # in x0's memory format
        return cond, t, noise

    def loss(self, x0, cond, t, noise):
        """The weighted denoising loss (``diffusion.losses.denoising_loss``) for given draws."""
        a, s = (table[t][:, None, None, None] for table in (self.signal_scale, self.noise_scale))
        # from_x0_eps is plain arithmetic, so it works on torch tensors as it is.
        target = forward.from_x0_eps(x0, noise, self.config.parameterization, a, s)
        prediction = self.model(a * x0 + s * noise, t.float(), cond)
        return (((prediction - target) ** 2).mean(dim=(1, 2, 3)) * self.weight[t]).mean()

    def __call__(self, x0, cond, t, noise):
        """One optimisation step with the given draws; returns (loss, gradient norm before clipping)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x0, cond, t, noise)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.config.grad_clip, foreach=True)
        self.optimizer.step()
        decay = min(self.config.ema_decay, (1.0 + self.steps_done) / (10.0 + self.steps_done))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - decay)  # ema = decay ema + (1 - decay) params
        self.steps_done += 1
        return loss.detach(), grad_norm
