"""The run configuration: presets, validation with messages, the U-Net's own config, compatibility on resume."""

import dataclasses
import json

import numpy as np
import pytest

from diffusion import configs
from diffusion.errors import ConfigError
from diffusion.unet import UNET_FIELDS, UNetConfig


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(learning_rate=-1.0), "learning_rate must be a positive number"),
        (dict(batch_size=0), "batch_size must be a whole number >= 1"),
        (dict(dataset="cifar-100"), "unknown dataset 'cifar-100'; choose one of"),
        (dict(warmup_steps=20), r"warmup_steps \(20\) must be fewer than steps \(20\)"),
        (dict(attention_resolutions=(8,)), r"levels run at \[28, 14\]"),
        (dict(parameterization="eps", zero_terminal_snr=True), "needs parameterization v or x0"),
        (dict(parameterization="velocity", min_snr_gamma=5.0), "set --min-snr-gamma 0"),
        (dict(schedule="quadratic"), "unknown schedule"),
        (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
        (dict(label_dropout=1.5), "label_dropout"),
        (dict(name="a/b"), "plain folder name"),
        (dict(no_such_field=1), "unknown config field"),
    ],
)
def test_bad_config_values_fail_with_a_message(change, message):
    with pytest.raises(ConfigError, match=message):
        configs.make_config("tiny", **change)


def test_the_network_settings_are_one_unet_config():
    config = configs.make_config("tiny")
    outside = ("context_dim", "guidance_embedding")  # set by TextConfig and DistillConfig
    assert [f.name for f in dataclasses.fields(UNetConfig) if f.name not in outside] == list(UNET_FIELDS)
    assert config.unet.context_dim == 0  # a text model's comes from its encoder: see the text config's test
    assert config.unet == UNetConfig(**{name: getattr(config, name) for name in UNET_FIELDS})
    assert config.unet.widths == [8, 16] and config.unet.resolutions == [28, 14]
    with pytest.raises(ConfigError, match="norm_groups=3 does not divide the 8 channels"):
        configs.make_config("tiny", norm_groups=3)  # checked by UNetConfig, reported by the run's config


def test_whole_numbers_are_whole_numbers_everywhere():
    assert configs.make_config("tiny", batch_size=np.int64(8)).batch_size == 8
    for name in ("batch_size", "steps", "seed"):
        with pytest.raises(ConfigError, match=f"{name} must be a whole number"):
            configs.make_config("tiny", **{name: True})


def test_the_saved_config_records_its_kind_and_round_trips():
    config = configs.make_config("tiny", channel_mult=[1, 2])
    saved = config.to_dict()
    assert saved["kind"] == "denoiser" and saved["channel_mult"] == (1, 2)
    assert configs.config_from_dict(json.loads(json.dumps(saved))) == config


def test_resuming_needs_the_same_architecture_only():
    saved = configs.make_config("tiny")
    configs.check_compatible(saved, dataclasses.replace(saved, steps=40, learning_rate=1e-4, dropout=0.1), "x")
    with pytest.raises(ConfigError, match=r"checkpoint x was trained with channels=8, but the config asks for chann"):
        configs.check_compatible(saved, dataclasses.replace(saved, channels=16), "x")


def test_a_text_config_is_a_config_with_a_text_encoder():
    for name in ("text", "text-gpu"):
        assert configs.make_config(name).kind == "text"
    gpu = configs.make_config("gpu").unet  # the text-gpu U-Net is the gpu one, reading text instead of labels
    assert configs.make_config("text-gpu").unet == dataclasses.replace(gpu, context_dim=128, num_classes=0)
    config = configs.make_config("text-tiny")
    assert isinstance(config, configs.TextConfig) and config.kind == "text" and config.to_dict()["kind"] == "text"
    assert config.unet.context_dim == config.text_width == config.text_encoder.width == 8
    assert config.text_encoder.vocab_size == len(config.vocabulary) and config.num_classes == 0
    assert config.tokenizer.decode(config.tokenizer.encode("Thin 3")) == "thin three"
    again = configs.config_from_dict(json.loads(json.dumps(config.to_dict())), configs.TextConfig)
    assert again == config  # the vocabulary survives JSON as a tuple
    for change, message in [
        (dict(num_classes=10), "steered by prompts, not labels"),
        (dict(prompt_dropout=1.0), r"prompt_dropout must be in \[0, 1\)"),
        (dict(text_heads=3), "text_heads=3 does not divide text_width=8"),
        (dict(vocabulary=("a", "b")), "the vocabulary starts with <pad> and <empty>"),
        (dict(dataset="fashion-mnist"), "a text run captions handwritten digits: use dataset mnist-embedded or mnist"),
    ]:
        with pytest.raises(ConfigError, match=message):
            configs.make_config("text-tiny", **change)
    with pytest.raises(ConfigError, match="unknown config field.s. text_width for preset cpu"):
        configs.make_config("cpu", text_width=16)
    with pytest.raises(ConfigError, match="holds a denoiser model, but the config is of a text model"):
        configs.check_compatible(configs.make_config("tiny"), config, "here")
    with pytest.raises(ConfigError, match="trained with text_layers=1, but the config asks for text_layers=2"):
        configs.check_compatible(config, dataclasses.replace(config, text_layers=2), "here")
