"""Measure what "perfect" scores on each quality metric, and how much it moves between draws.

    .venv/bin/python scripts/measure_metric_floors.py            # about two minutes on 2 CPU cores

Prints the Markdown tables of docs/metrics.md: the real-vs-real floor of the
MNIST-classifier FID, precision and recall at several sample sizes; whether the
classifier having seen the floor's digits matters; the metrics of real digits
with known damage; and the sliced Wasserstein distance and mode weights of two
samples of the same 2-D mixture.
"""

import jax
import numpy as np

from diffusion import data, metrics, mixture

DRAWS = 10


def digit_floors(test_feats, train_feats, train_labels):
    print(f"Real-vs-real: n training digits against the 1,000 held-out digits, {DRAWS} draws (mean ± std):\n")
    print("| n | classes | FID floor | precision | recall |")
    print("|---|---|---|---|---|")
    by_class = [np.flatnonzero(train_labels == d) for d in range(10)]
    for n in (100, 250, 500, 1000, 2000, 5000):
        for balanced in (True, False):
            rows = []
            for seed in range(DRAWS):
                rng = np.random.default_rng(seed)
                if balanced:
                    picks = np.concatenate([rng.choice(members, n // 10, replace=False) for members in by_class])
                else:
                    picks = rng.choice(len(train_feats), n, replace=False)
                drawn = train_feats[picks]
                rows.append([metrics.frechet_distance(drawn, test_feats), *metrics.precision_recall(test_feats, drawn)])
            rows = np.array(rows)
            classes = "n/10 each" if balanced else "random"
            print(f"| {n:,} | {classes} | {_ms(rows[:, 0])} | {_ms(rows[:, 1], 3)} | {_ms(rows[:, 2], 3)} |")


def _ms(values, digits=2):
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def seen_versus_unseen(test_feats, train_feats):
    """Does it matter that the floor's digits were seen by the classifier? Compare 500 vs 500 disjoint sets."""
    unseen, seen = [], []
    for seed in range(DRAWS):
        rng = np.random.default_rng(seed)
        order = rng.permutation(1000)
        half_a, half_b = test_feats[order[:500]], test_feats[order[500:]]
        unseen.append(metrics.frechet_distance(half_a, half_b))
        seen.append(metrics.frechet_distance(train_feats[rng.choice(9000, 500, replace=False)], half_b))
    print("\nFID of 500 digits against 500 other held-out digits (random classes):\n")
    print("| the 500 digits | FID |")
    print("|---|---|")
    print(f"| held-out (unseen by the classifier) | {_ms(unseen)} |")
    print(f"| training (seen by the classifier) | {_ms(seen)} |")


def degradations(train_images, train_labels):
    """How the numbers move when known damage is done to 1,000 real digits (100 per class)."""
    rng = np.random.default_rng(0)
    picks = np.concatenate([rng.choice(np.flatnonzero(train_labels == d), 100, replace=False) for d in range(10)])
    images, labels = data.to_model_range(train_images[picks]), train_labels[picks]
    cases = {"none (real digits)": images}  # damage -> images, all conditioned on ``labels``
    for std in (0.1, 0.3, 0.6):
        cases[f"Gaussian noise, std {std}"] = images + std * rng.standard_normal(images.shape).astype(np.float32)
    blurred = sum(np.roll(np.roll(images, dy, 1), dx, 2) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    cases["3 x 3 box blur"] = blurred
    cases["shifted 3 px right"] = np.concatenate([np.full_like(images[:, :, :3], -1.0), images[:, :, :-3]], axis=2)
    cases["uniform noise"] = rng.uniform(-1, 1, images.shape).astype(np.float32)
    collapsed = data.to_model_range(np.concatenate([train_images[train_labels == d][:500] for d in (0, 1)]))
    print("\nevaluate_digits on 1,000 damaged real digits (100 per class) against the held-out digits:\n")
    print("| damage | accuracy | FID | floor | precision | recall |")
    print("|---|---|---|---|---|---|")
    rows = [(name, metrics.evaluate_digits(damaged, labels)) for name, damaged in cases.items()]
    rows.append(("unconditional, only 0s and 1s (mode collapse)", metrics.evaluate_digits(collapsed)))
    for name, r in rows:
        accuracy = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        print(
            f"| {name} | {accuracy} | {r['fid']:.1f} | {r['floor']:.1f} ± {r['floor_std']:.1f} "
            f"| {r['precision']:.3f} | {r['recall']:.3f} |"
        )


def toy_floors():
    ring = mixture.ring_mixture()
    print("\nSliced Wasserstein (256 projections) between two independent samples of the 8-mode ring mixture,")
    print(f"{DRAWS} pairs (mean ± std), and the largest deviation of a mode weight from 1/8:\n")
    print("| n | SW_1 | SW_2 | max abs(weight - 1/8) |")
    print("|---|---|---|---|")
    for n in (1000, 5000, 20000):
        rows = []
        for seed in range(DRAWS):
            key_a, key_b = jax.random.split(jax.random.key(seed))
            x, _ = mixture.sample(ring, key_a, n)
            y, _ = mixture.sample(ring, key_b, n)
            rows.append([
                metrics.sliced_wasserstein(x, y, seed=seed),
                metrics.sliced_wasserstein(x, y, seed=seed, p=2),
                np.max(np.abs(metrics.mode_weights(x, ring) - 1 / 8)),
            ])
        rows = np.array(rows)
        print(f"| {n:,} | {_ms(rows[:, 0], 3)} | {_ms(rows[:, 1], 3)} | {_ms(rows[:, 2], 4)} |")
    shrunk = []
    for seed in range(DRAWS):
        key_a, key_b = jax.random.split(jax.random.key(seed))
        x, _ = mixture.sample(ring, key_a, 5000)
        y, _ = mixture.sample(ring, key_b, 5000)
        shrunk.append([metrics.sliced_wasserstein(0.9 * np.asarray(x), y, seed=seed, p=p) for p in (1, 2)])
    shrunk = np.array(shrunk)
    print(f"\n5,000 samples shrunk by 10 % towards the centre: SW_1 {_ms(shrunk[:, 0], 3)}, SW_2 {_ms(shrunk[:, 1], 3)}")


def main():
    test_images, test_labels = data.load_embedded_mnist("test")
    train_images, train_labels = data.load_embedded_mnist("train")
    print(f"Held-out accuracy of the classifier: {metrics.classifier_accuracy(test_images, test_labels):.1%}\n")
    test_feats, train_feats = metrics.classifier_features(test_images), metrics.classifier_features(train_images)
    digit_floors(test_feats, train_feats, train_labels)
    seen_versus_unseen(test_feats, train_feats)
    degradations(train_images, train_labels)
    toy_floors()


if __name__ == "__main__":
    main()
