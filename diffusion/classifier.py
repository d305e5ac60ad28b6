"""A small digit classifier: the judge behind the quality numbers of ``diffusion.metrics``.

Inception features, the basis of the usual FID (Heusel et al. 2017), were
learned on photographs and say little about 28 x 28 digits. The common
practice on MNIST, followed here, is to train a small classifier on the
digits themselves and use it twice:

- its *predictions* tell whether a generated "7" is recognisably a 7;
- its *penultimate features* (``DigitClassifier.features``, 128 numbers per
  image) are the space in which generated and real digits are compared
  (Fréchet distance, precision / recall).

The network is a plain CNN, 52,330 parameters, with no batch normalisation
or dropout, so that it is one pure function of its weights (NHWC, inputs in
the model range [-1, 1] of ``diffusion.data.to_model_range``):

    [conv 3x3 -> ReLU -> max-pool 2]  x 3   28 -> 14 -> 7 -> 3 pixels; 16, 32, 32 channels
    flatten (288) -> dense 128 -> ReLU      the features
    dense 10                                the logits (``num_classes`` of them; 10 for digits)

``train_classifier`` fits it with Adam on randomly shifted digits (up to 2
pixels each way, so that a digit drawn a little off centre is still
recognised); ``scripts/train_classifier.py`` runs it on the embedded training
split and writes the weights that ship with the package,
``diffusion/data/mnist_classifier.npz``, which ``load_classifier`` reads.
With ``num_classes`` > 10 the same network and training judge more than
digits: ``diffusion.concepts`` fits it to digits plus new letters, or to plain
plus styled digits, to measure what a fine-tuned diffusion model draws.
"""

from __future__ import annotations

import importlib.resources
import io
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diffusion import data, files
from diffusion.errors import ClassifierError, is_whole

WEIGHTS_FILE = "mnist_classifier.npz"
REGENERATE = "regenerate it with `.venv/bin/python scripts/train_classifier.py` (a few minutes on a CPU)"


class DigitClassifier(nnx.Module):
    """The CNN of the module docstring: 28 x 28 x 1 digits in [-1, 1] -> ``num_classes`` logits (10 for digits)."""

    def __init__(self, rngs: nnx.Rngs, channels=(16, 32, 32), feature_dim: int = 128, num_classes: int = 10):
        c1, c2, c3 = channels
        self.conv1 = nnx.Conv(1, c1, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), rngs=rngs)
        self.conv3 = nnx.Conv(c2, c3, (3, 3), rngs=rngs)
        self.hidden = nnx.Linear(3 * 3 * c3, feature_dim, rngs=rngs)
        self.head = nnx.Linear(feature_dim, num_classes, rngs=rngs)

    def features(self, x):
        """The penultimate activations, shape (B, feature_dim): what the Fréchet distance compares."""
        for conv in (self.conv1, self.conv2, self.conv3):
            x = nnx.max_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
        return nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))

    def __call__(self, x):
        """Logits, shape (B, num_classes)."""
        return self.head(self.features(x))


def random_shift(key, x, max_shift: int):
    """Move each image of x (B, H, W, C) by its own random whole-pixel offset in [-max_shift, max_shift]^2.

    Pixels shifted in are background (-1, the model range's black).
    """
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (x.shape[0], 2), 0, 2 * max_shift + 1)
    crop = lambda image, dy, dx: jax.lax.dynamic_slice(image, (dy, dx, 0), (height, width, x.shape[3]))  # noqa: E731
    return jax.vmap(crop)(padded, offsets[:, 0], offsets[:, 1])


def train_classifier(
    images,
    labels,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    max_shift: int = 2,
    seed: int = 0,
    log_every: int = 0,
    num_classes: int = 10,
) -> DigitClassifier:
    """Fit a fresh ``DigitClassifier`` to uint8 digits (N, 28, 28) and labels (N,); return it.

    Adam (Kingma & Ba 2015) on the cross-entropy, learning rate decayed to 0
    along a cosine, each batch randomly shifted by up to ``max_shift`` pixels.
    Deterministic: the initial weights, the batches (``diffusion.data.batches``)
    and the shifts depend only on ``seed``. ``log_every`` > 0 prints the mean
    training loss every that many steps.

    ``num_classes`` is the size of the output layer; labels must lie in
    0..num_classes-1. The default, 10, is the digit classifier of
    ``diffusion.metrics`` (the same initial weights and training as before the
    argument existed); larger values fit the judges of ``diffusion.concepts``.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(
            f"need uint8 digits (N, 28, 28) and one label each, as diffusion.data.load_embedded_mnist gives; "
            f"got {images.dtype} {images.shape} and labels {labels.shape}"
        )
    if steps < 1 or batch_size < 1 or learning_rate <= 0 or max_shift < 0:
        raise ValueError(
            f"need steps >= 1, batch_size >= 1, learning_rate > 0, max_shift >= 0 "
            f"(got {steps}, {batch_size}, {learning_rate}, {max_shift})"
        )
    if not is_whole(num_classes, 2):
        raise ValueError(f"num_classes must be a whole number >= 2 (got {num_classes!r})")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array (class numbers), got dtype {labels.dtype}")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1} for num_classes={num_classes} "
            f"(got {labels.min()}..{labels.max()}); raise num_classes or fix the labels"
        )
    init_key, shift_key = jax.random.split(jax.random.key(seed))
    # Initialising under jit compiles one program instead of dozens of small eager ones (~2 s saved on a CPU).
    init = lambda key: nnx.split(DigitClassifier(nnx.Rngs(key), num_classes=num_classes))  # noqa: E731
    graphdef, params = jax.jit(init)(init_key)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    opt_state = optimizer.init(params)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, opt_state, x, y, step):
        x = random_shift(jax.random.fold_in(shift_key, step), x, max_shift)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    stream = data.batches(images, labels, batch_size, seed)
    losses = []
    for step in range(steps):
        x, y = next(stream)
        params, opt_state, loss = train_step(params, opt_state, data.to_model_range(x), y.astype(np.int32), step)
        losses.append(loss)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:5d}/{steps}  loss {float(np.mean(losses)):.4f}", flush=True)
            losses = []
    return nnx.merge(graphdef, params)


def logits_and_features(model: DigitClassifier, x, batch_size: int = 500):
    """``model``'s logits (N, num_classes) and features (N, feature_dim) for images x (N, 28, 28, 1) in [-1, 1].

    Runs in batches of ``batch_size`` (the last one padded), so any N compiles
    at most once per model structure; returns float64 NumPy arrays.
    """
    x = np.asarray(x, np.float32)
    n = len(x)
    padded = np.concatenate([x, np.full((-n % batch_size, *x.shape[1:]), -1.0, np.float32)])
    graphdef, params = nnx.split(model)
    outputs = [_logits_and_features(graphdef, params, padded[i : i + batch_size]) for i in range(0, len(padded), batch_size)]
    logits, features = (np.concatenate([np.asarray(o[j], np.float64) for o in outputs])[:n] for j in (0, 1))
    return logits, features


@jax.jit
def _logits_and_features(graphdef, params, x):
    model = nnx.merge(graphdef, params)
    features = model.features(x)
    return model.head(features), features


# ---------------------------------------------------------------------------
# The committed weights: a flat .npz, one array per parameter, no pickle
# ---------------------------------------------------------------------------


def default_weights_path() -> Path:
    """Where the committed weights live: ``diffusion/data/mnist_classifier.npz`` inside the package."""
    return Path(str(importlib.resources.files("diffusion") / "data" / WEIGHTS_FILE))


def _flat_params(model: DigitClassifier) -> dict[str, np.ndarray]:
    """Every parameter of ``model`` as {"conv1/kernel": array, ...}: key paths joined by '/'."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): variable.get_value() for path, variable in flat}


def save_classifier(model: DigitClassifier, path=None) -> Path:
    """Write ``model``'s weights to ``path`` (default: the committed file) atomically; return the path.

    Through ``diffusion.files.write_atomically``: the file is always either the
    old weights or the complete new ones.
    """
    path = Path(path) if path is not None else default_weights_path()
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in _flat_params(model).items()})
    files.write_atomically({path: buffer.getvalue()})
    return path


def load_classifier(path=None) -> DigitClassifier:
    """The trained classifier, read from ``path`` (default: the committed ``mnist_classifier.npz``).

    Raises ``ClassifierError``, saying how to regenerate the file, if it is
    missing, unreadable, or does not hold exactly this network's weights.
    """
    path = Path(path) if path is not None else default_weights_path()
    model = nnx.eval_shape(lambda: DigitClassifier(nnx.Rngs(0)))
    expected = {name: (a.shape, np.dtype(a.dtype)) for name, a in _flat_params(model).items()}
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
    except FileNotFoundError:
        raise ClassifierError(f"the classifier weights {path} are missing; {REGENERATE}") from None
    except Exception as err:  # a truncated or garbled file can fail in zipfile, numpy or zlib
        raise ClassifierError(f"cannot read the classifier weights {path} ({err}); {REGENERATE}") from None
    found = {name: (a.shape, a.dtype) for name, a in arrays.items()}
    if found != expected:
        raise ClassifierError(
            f"{path} does not hold this classifier's weights (expected {sorted(expected)} with shapes "
            f"{[expected[k][0] for k in sorted(expected)]}; found {sorted(found)}); {REGENERATE}"
        )
    state = nnx.state(model, nnx.Param)
    for name_path, variable in nnx.to_flat_state(state):
        variable.set_value(jnp.asarray(arrays["/".join(map(str, name_path))]))
    nnx.update(model, state)
    return model
