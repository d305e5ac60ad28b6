"""Denoising diffusion in JAX, written to be read.

One idea per module:

- ``schedules``  noise schedules (beta, alpha_bar, sigma, SNR) and timestep spacing
- ``forward``    the forward process q(x_t | x_0) and conversions between parameterizations
- ``mixture``    Gaussian mixtures and their exact (closed-form) denoiser
- ``samplers``   the reverse process: DDPM, DDIM, PLMS, Euler (ancestral), Heun, DPM++ 2M, flow Euler / Heun
- ``guidance``   classifier-free guidance, negative conditions, guidance rescale
- ``editing``    img2img (SDEdit strength), inpainting (with RePaint), DDIM inversion
- ``unet``       the denoising U-Net (Flax NNX) and its adapter to the samplers
- ``losses``     the training objectives: eps / x0 / v (optionally min-SNR weighted), flow matching
- ``training``   configuration and presets, the compiled train step, EMA, devices, the training loop
- ``checkpoint`` atomic, pickle-free checkpoints, the last K kept
- ``data``       the embedded MNIST digits, full MNIST / Fashion-MNIST downloads, 2-D toys
- ``generate``   what sample.py does: settings stored in PNGs, seeds and slerp, edits, trajectories
- ``classifier`` a small digit classifier, the judge behind the quality metrics
- ``metrics``    classifier accuracy and FID, precision / recall, sliced Wasserstein, mode weights
- ``plotting``   image grids for notebooks and scripts
- ``notebook``   what the notebooks share: the fast-mode switch and a trained model
"""
