"""What an autoencoder keeps: reconstructions measured against the digits, with the classifier and FID.

    .venv/bin/python benchmarks/autoencoder_quality.py [--autoencoder runs/autoencoder]

Prints, for the autoencoder run's last checkpoint (EMA weights):

- its parameters, and the time to encode and to decode the 1,000 held-out
  (test) digits in batches of 500 (compiled first, then timed);
- PSNR of the reconstructions (decoded posterior means) of the held-out
  digits, and the classifier's accuracy on them beside its accuracy on the
  originals;
- classifier FID of the reconstructions of 1,000 training digits (100 per
  class) against the held-out ones, beside the floor of 1,000 real digits with the same labels
  (``metrics.evaluate_digits``; reconstructing the reference digits themselves
  would pair every image with its own original);
- the latents' mean and standard deviation before and after the scale factor.
"""

import argparse
import sys
import time

import jax
import numpy as np

from diffusion import autoencoder, data, latent, metrics, runs


def timed(function, x, batch: int = 500):
    """(outputs, seconds) of ``function`` over ``x`` in batches, compiled on the first batch before timing."""
    jax.block_until_ready(function(x[:batch]))
    started = time.perf_counter()
    out = np.concatenate([np.asarray(function(x[i : i + batch])) for i in range(0, len(x), batch)])
    return out, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autoencoder", default="runs/autoencoder")
    args = parser.parse_args(argv)
    opened, scale = runs.open_autoencoder(args.autoencoder)
    model = runs.load_model(opened)
    space = latent.latent_space(model, scale)
    parameters = sum(leaf.size for leaf in jax.tree.leaves(space.weights))

    test_pixels, test_labels = data.load_dataset(opened.config.dataset, "test")
    x = data.to_model_range(test_pixels)
    z, encode_s = timed(space.encode, x)
    x_hat, decode_s = timed(space.decode, z)
    psnr = autoencoder.psnr(x, x_hat)
    train_pixels, train_labels = data.load_dataset(opened.config.dataset, "train")
    picks = np.concatenate([np.flatnonzero(train_labels == digit)[:100] for digit in range(10)])  # 100 per class
    train_hat = np.clip(np.asarray(space.decode(space.encode(data.to_model_range(train_pixels[picks])))), -1.0, 1.0)
    scores = metrics.evaluate_digits(train_hat, train_labels[picks])
    unscaled = z / scale

    print(f"autoencoder {opened.path} ({opened.config.latent_channels} latent channels, "
          f"{opened.config.autoencoder.latent_shape} per image, kl_weight {opened.config.kl_weight:g}, "
          f"{opened.config.reconstruction})")
    print(f"  parameters {parameters:,}; encode {1e3 * encode_s / len(x):.2f} ms, decode {1e3 * decode_s / len(x):.2f}"
          f" ms per image (batches of 500)")
    print(f"  held-out PSNR {psnr.mean():.2f} dB (10th percentile {np.percentile(psnr, 10):.2f})")
    read_right = metrics.classifier_accuracy(np.clip(x_hat, -1, 1), test_labels)
    print(f"  classifier accuracy: reconstructions {read_right:.3f}, originals "
          f"{metrics.classifier_accuracy(x, test_labels):.3f}")
    print(f"  classifier FID of reconstructions {scores['fid']:.2f} (floor {scores['floor']:.2f} ± "
          f"{scores['floor_std']:.2f}); precision {scores['precision']:.3f}, recall {scores['recall']:.3f}")
    print(f"  latents: mean {unscaled.mean():+.3f}, std {unscaled.std():.3f}; scale factor {scale:.4f}; "
          f"scaled: mean {z.mean():+.3f}, std {z.std():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
