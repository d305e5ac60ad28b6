"""Train a model: ``python train.py [--preset NAME] [--field value ...]`` (the presets: ``diffusion.configs.PRESETS``).

Every field of the preset's config is a flag (``--learning-rate 1e-3``,
``--channel-mult 1,2,2``, ``--resume``): ``diffusion.configs.Config``, and
with a text preset ``TextConfig`` (``--text-width 64``), with an autoencoder
preset ``AutoencoderRunConfig`` (``--kl-weight 1e-6``), with a latent preset
``LatentConfig`` (``--autoencoder runs/autoencoder``); flags override the
preset. Examples:

    python train.py                          # the cpu preset: digits in ~7 minutes on 2 cores
    python train.py --preset text --name text   # prompts: "a bold seven leaning right", ~14 minutes
    python train.py --preset autoencoder     # 28×28 digits to 7×7×4 latents, into runs/autoencoder
    python train.py --preset latent --autoencoder runs/autoencoder   # diffusion on its latents, into runs/latent
    python train.py --preset tiny --name t   # seconds, for a first look
    python train.py --name default --resume  # continue a run from its last checkpoint
    python train.py --preset gpu --dataset fashion-mnist

The run folder ``runs/<name>/`` receives checkpoints, metrics.jsonl and loss.png.
Run as a script, it first applies the XLA:CPU settings of ``diffusion.cpu``
(restarting itself once for huge pages; ``GLIBC_TUNABLES=`` opts out).
"""

import sys

from diffusion import cpu

if __name__ == "__main__":  # before JAX is imported: see diffusion/cpu.py
    cpu.configure()
    cpu.restart_with_huge_pages()

from diffusion import cli, training  # noqa: E402


def run(argv=None) -> int:
    config = cli.config_from_flags(argv, description=__doc__.splitlines()[0])
    state = training.train(config)
    return 0 if int(state.step) >= config.steps else 130  # 130: stopped by Ctrl-C (after saving)


def main(argv=None) -> int:
    """The exit status: 0 when done, 2 for bad input (one line on stderr; see ``cli.run_main``)."""
    return cli.run_main(run, argv, interrupted="interrupted without saving; the last checkpoint is kept")


if __name__ == "__main__":
    sys.exit(main())
