"""Denoising diffusion in JAX, written to be read.

One idea per module, from the ground floor up (each imports only modules above it in this list):

- ``errors``     the one family of errors for bad input, and the whole-number check
- ``schedules``  noise schedules (beta, alpha_bar, sigma, SNR) and timestep spacing
- ``data``       the embedded MNIST digits, full MNIST / Fashion-MNIST downloads, batches
- ``files``      atomic writes of files and folders, sha256 of a file
- ``checkpoint`` atomic, pickle-free checkpoints, the last K kept
- ``images``     arrays to pixels, grids and figures, PNG / GIF files, input images and masks
- ``noise``      the starting noise of a seed, slerp between seeds
- ``forward``    the forward process q(x_t | x_0), its posterior, conversions between parameterizations
- ``mixture``    Gaussian mixtures and their exact (closed-form) denoiser
- ``samplers``   the reverse process: DDPM, DDIM, PLMS, Euler (ancestral), Heun, DPM++ 2M, flow Euler / Heun
- ``guidance``   classifier-free guidance, negative conditions, guidance rescale
- ``editing``    img2img (SDEdit strength), inpainting (with RePaint), DDIM inversion
- ``unet``       the denoising U-Net (Flax NNX), its config, and its adapter to the samplers
- ``lora``       low-rank adapters (LoRA) of a trained U-Net, new class labels, merging
- ``concepts``   fine-tuning data made on the spot (rendered letters, styled digits) and their judges
- ``losses``     the training objectives: eps / x0 / v (optionally min-SNR weighted), flow matching
- ``configs``    what a run is: its settings, the presets, their checks
- ``runs``       where a run lives: its folder, checkpoints, kind of model, loading it in one call
- ``training``   the compiled train step, EMA, devices, the training loop
- ``generate``   what sample.py does: settings stored in PNGs, seeds, edits, trajectories
- ``classifier`` a small digit classifier, the judge behind the quality metrics
- ``metrics``    classifier accuracy and FID, precision / recall, sliced Wasserstein, mode weights
- ``evaluation`` generate digits from a checkpoint and measure them (what evaluate.py does)
- ``cli``        what the command-line tools share: flags, reading them, one-line errors
- ``cpu``        the XLA:CPU settings train.py applies before JAX starts
- ``notebook``   what the notebooks share: the fast-mode switch and a trained model
"""
