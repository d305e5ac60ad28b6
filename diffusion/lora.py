"""LoRA: teach a trained model something new by training a small low-rank update beside its frozen weights.

Hu et al. 2021 (LoRA, Sec. 4.1, eq. 3): a layer with a weight matrix W0 of
shape (in, out) keeps W0 frozen and learns an update of rank r << min(in, out),

    h = x W0 + (alpha / r) · x A B,        A: (in, r),  B: (r, out),

A drawn at random and B zero, so that training starts from the base model
exactly. Only A and B train: r · (in + out) numbers instead of in · out.
``alpha`` fixes the size of the update as r changes (the paper sets it once and
does not tune it); on top of it a user's ``scale`` (``sample.py --lora-scale``)
turns the adapter down (0: the base model, bit for bit) or up (> 1: more of it).

**Convolutions.** A k×k convolution is a matrix product over patches: its
kernel (k, k, in, out) is a matrix of shape (k·k·in, out). Its LoRA is then
A (k, k, in, r), a k×k convolution down to r channels with the base's stride
and padding, followed by B (r, out), a 1×1 convolution back up. The two forms
people name for convolutional LoRA, "a k×k down-projection then a 1×1
up-projection" and "the reshaped kernel matrix times a low-rank product", are
the same computation: the update to the kernel is
ΔW[i, j, c, o] = (alpha / r) Σ_s A[i, j, c, s] B[s, o] either way
(``delta``). Unmerged, the layer runs the two thin convolutions beside the
base one, as eq. 3 does; ``merge`` adds ΔW into the base kernel, so that the
adapted model costs exactly what the base costs (Hu et al., Sec. 4.2: "no
additional inference latency"), and ``unmerge`` takes it out again.

**Which layers** (``TARGETS``): the residual blocks' 3×3 convolutions
(``conv``), the projection of the conditioning vector into each block
(``embedding``), self-attention's projections (``attention``) and, in a text
model, cross-attention's (``cross_attention``; Stable Diffusion's LoRAs adapt
these above all).

**A new concept** needs a way to be asked for. A label model gets new class
labels: their embeddings are new rows of the label table, trained with the
adapter (``NewClasses``); the base's own rows, the digits' and the null label's,
stay frozen. With ``new_classes`` = k the adapted model's labels are
0 .. n-1 (the base's), n .. n+k-1 (the new ones) and n+k (null), so every
sampler and guidance function reads it as a class-conditional model of n+k
classes. (DreamBooth, Ruiz et al. 2023, binds a subject to a rare word of a
text model in the same spirit.)

**Flax NNX.** ``nnx.LoRA`` and ``nnx.LoRALinear`` compute ``base(x) + x A B``
for dense layers: no alpha / r, no scale that can change after training, no
convolutions and no merge. The ``LoRA`` module below adds those; it keeps
NNX's variable type, ``nnx.LoRAParam``, for A, B and new label rows, so
``nnx.state(model, nnx.LoRAParam)`` is exactly the adapter and ``nnx.split``
separates it from the frozen base. Adapting is graph surgery on a live NNX
module (``add_adapter`` replaces layers by wrappers, in place); a second
adapter wraps the first, each with its own scale.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.attention import CrossAttention, SelfAttention
from diffusion.errors import ConfigError, InputError, check_whole
from diffusion.unet import ResBlock, UNet

# The groups of layers an adapter can target: in each kind of block, the attributes that name them.
TARGETS = {
    "conv": (ResBlock, ("conv1", "conv2")),
    "embedding": (ResBlock, ("emb_proj",)),
    "attention": (SelfAttention, ("qkv", "out")),
    "cross_attention": (CrossAttention, ("q", "kv", "out")),
}


class LoRAScale(nnx.Variable):
    """The user's scale of one adapter: a variable, so that changing it does not recompile a sampler."""


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What an adapter is: its rank r, its alpha, the layers it targets and the new class labels it adds.

    Checked on construction (a ConfigError says what to change).
    """

    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = ("conv", "embedding", "attention")
    new_classes: int = 0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        check_whole("rank", self.rank, 1, ConfigError)
        check_whole("new_classes", self.new_classes, 0, ConfigError)
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha must be a positive number (got {self.alpha!r}); the rank is the usual choice")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(
                f"targets must name distinct layer groups among {', '.join(TARGETS)} (got {','.join(self.targets)})"
            )


class LoRA(nnx.Module):
    """A dense or convolutional layer ``base`` plus the low-rank update of Hu et al. 2021, eq. 3.

    ``y = base(x) + scale · (alpha / rank) · B(A(x))``: for ``nnx.Linear``, A (in, r) and B (r, out) are
    matrices; for ``nnx.Conv`` with kernel (k, k, in, out), A (k, k, in, r) is a convolution with the base's
    stride and padding and B (r, out) a 1×1 convolution. A starts like a dense layer's kernel (variance
    1 / fan-in), B at zero. ``merged``: the update lives in the base kernel (``merge``) and is not computed
    again.
    """

    def __init__(self, base: nnx.Linear | nnx.Conv, rank: int, alpha: float, *, rngs: nnx.Rngs):
        self.base, self.rank, self.alpha, self.merged = base, rank, alpha, False
        *receptive, fan_in, out = _kernel(base).shape  # receptive: (k, k) for a convolution, () for a dense layer
        fan_in_total = fan_in * math.prod(receptive)
        shape_a = (*receptive, fan_in, rank)
        self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), shape_a) / math.sqrt(fan_in_total))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out)))
        self.scale = LoRAScale(jnp.ones((), jnp.float32))

    def __call__(self, x):
        y = self.base(x)
        if self.merged:
            return y
        a, b = self.lora_a[...], self.lora_b[...]
        if a.ndim == 2:
            h = x @ a.astype(x.dtype)
        else:
            conv = innermost(self)
            h = jax.lax.conv_general_dilated(
                x, a.astype(x.dtype), window_strides=_pair(conv.strides), padding=conv.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        return y + (self.scale[...] * self.alpha / self.rank) * (h @ b.astype(x.dtype)).astype(y.dtype)

    def delta(self):
        """The update this adapter adds to the base kernel, scale · (alpha / r) · A B, in the kernel's shape."""
        a, b = self.lora_a[...], self.lora_b[...]
        return self.scale[...] * self.alpha / self.rank * jnp.tensordot(a, b, axes=1)


class NewClasses(nnx.Module):
    """A label embedding with ``count`` new rows between the base's classes and its null label.

    The base table holds rows 0 .. n-1 (classes) and n (null); the adapted one rows 0 .. n-1, then the new
    classes n .. n+count-1 (``nnx.LoRAParam``: they train with the adapter), then null at n+count. Rows drawn
    like ``nnx.Embed``'s (variance 1); the base's rows are untouched, so its labels mean what they meant.
    """

    def __init__(self, base: nnx.Embed | NewClasses, count: int, *, rngs: nnx.Rngs):
        self.base = base
        self.rows = nnx.LoRAParam(jax.random.normal(rngs.params(), (count, _table(base).shape[1])))

    @property
    def num_classes(self) -> int:
        """The real classes (the null label not counted): the base's and the new ones."""
        return _table(self).shape[0] - 1

    def __call__(self, labels):
        return jnp.take(_table(self), labels, axis=0)


def _table(embedding: nnx.Embed | NewClasses):
    """A label embedding's whole table: the base's classes, any new ones, the null label's row last."""
    if isinstance(embedding, nnx.Embed):
        return embedding.embedding[...]
    table = _table(embedding.base)
    return jnp.concatenate([table[:-1], embedding.rows[...].astype(table.dtype), table[-1:]])


def _kernel(layer) -> jax.Array:
    return innermost(layer).kernel[...]


def _pair(strides):
    return (strides, strides) if isinstance(strides, int) else tuple(strides)


def innermost(layer):
    """The plain ``nnx.Linear`` / ``nnx.Conv`` under any number of adapters."""
    while isinstance(layer, LoRA):
        layer = layer.base
    return layer


def target_layers(model: nnx.Module, targets) -> list[tuple[nnx.Module, str]]:
    """(block, attribute) of every layer of ``model`` in the groups ``targets`` (``TARGETS``), in graph order."""
    found = []
    for _, node in nnx.iter_graph(model):
        for target in targets:
            kind, names = TARGETS[target]
            if isinstance(node, kind):
                found += [(node, name) for name in names if getattr(node, name, None) is not None]
    return found


def add_adapter(model: UNet, config: AdapterConfig, rngs: nnx.Rngs) -> list[LoRA]:
    """Wrap every layer of ``model`` that ``config`` targets in a ``LoRA`` (B = 0: the model computes what it
    did) and add ``config.new_classes`` label rows; in place. Returns the new wrappers (``set_scale``).

    A ConfigError if a target group has no layer in this model (cross-attention in a label model), or new
    classes are asked of a model without labels.
    """
    for target in config.targets:
        if not target_layers(model, (target,)):
            raise ConfigError(f"this model has no {target} layers to adapt: leave {target} out of the targets")
    add_classes(model, config.new_classes, rngs)
    wrappers = []
    for block, name in target_layers(model, config.targets):
        wrappers.append(LoRA(getattr(block, name), config.rank, config.alpha, rngs=rngs))
        setattr(block, name, wrappers[-1])
    return wrappers


def add_classes(model: UNet, count: int, rngs: nnx.Rngs) -> None:
    """Give a class-conditional ``model`` ``count`` new labels (``NewClasses``), in place; 0 leaves it as it is."""
    if not count:
        return
    if model.label_emb is None:
        raise ConfigError("new classes need a class-conditional base model; this one has no labels")
    model.label_emb = NewClasses(model.label_emb, count, rngs=rngs)
    model.num_classes = model.label_emb.num_classes


def adapters(model: nnx.Module) -> list[LoRA]:
    """Every ``LoRA`` wrapper in ``model``, those of every adapter."""
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, LoRA)]


def set_scale(wrappers: list[LoRA], scale: float) -> None:
    """Set the user's scale of an adapter, given by its wrappers (what ``add_adapter`` returned, or
    ``adapters(model)`` for all of them); 0 turns it off, 1 is as trained."""
    for wrapper in wrappers:
        if wrapper.merged:
            raise InputError("the adapter is merged into the base weights: unmerge it before changing its scale")
        wrapper.scale.set_value(jnp.asarray(scale, jnp.float32))


def merge(model: nnx.Module) -> None:
    """Add every adapter's update into its base kernel, W = W0 + scale · (alpha / r) A B (Hu et al., Sec. 4.2),
    in place: the model then costs what the base costs. ``unmerge`` undoes it (to float rounding). Each kernel
    variable gets a new array (``set_value``), never writes into the old one, which a copy of the model, or
    NumPy arrays loaded from a checkpoint, may share."""
    for wrapper in adapters(model):
        if not wrapper.merged:
            layer = innermost(wrapper)
            layer.kernel.set_value(jnp.asarray(layer.kernel[...]) + wrapper.delta().astype(layer.kernel.dtype))
            wrapper.merged = True


def unmerge(model: nnx.Module) -> None:
    """Take every merged adapter's update out of its base kernel again, in place (the inverse of ``merge``)."""
    for wrapper in adapters(model):
        if wrapper.merged:
            layer = innermost(wrapper)
            layer.kernel.set_value(jnp.asarray(layer.kernel[...]) - wrapper.delta().astype(layer.kernel.dtype))
            wrapper.merged = False


def count(model: nnx.Module, variable=nnx.Param) -> int:
    """How many numbers ``model`` holds in variables of type ``variable`` (``nnx.LoRAParam``: its adapter)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, variable)))

