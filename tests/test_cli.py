"""The command line as users type it: one end-to-end run through the console entry point."""
import subprocess
import sys

import torch
from diffusers import StableDiffusionPipeline

from lora_booth import cli, config


def test_train_end_to_end_through_the_cli(tmp_path, photos, tiny_dir, capsys):
    out = tmp_path / "out"
    code = cli.main(["train", "model=tiny", f"instance_dir={photos}", "instance_prompt=a photo of sks dog",
                     "class_prompt=a photo of dog", f"output_dir={out}", "resolution=32", "max_steps=3",
                     "num_class_images=2", "prior.sample_steps=2", "rank=2", "train.device=cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "lora.rank = 2   (the command line)" in printed
    assert "trainable    unet" in printed
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.load_lora_weights(str(out))
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert (out / "config.yaml").is_file()


def test_user_errors_print_one_line_and_no_traceback(tmp_path, capsys):
    code = cli.main(["train", "rnak=4", f"output_dir={tmp_path}"])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert error.startswith("ConfigError: ") and "'rnak'" in error and "Did you mean 'rank'" in error
    code = cli.main(["train", "model=tiny", f"instance_dir={tmp_path / 'none'}", "instance_prompt=x",
                     "prior.weight=0", f"output_dir={tmp_path / 'o'}"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("ConfigError:") and "none, which does not exist" in error
    assert cli.main(["train", "rank"]) == 2
    assert "is not a key=value pair" in capsys.readouterr().err


def test_help_and_presets(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"  {key} = " in text for key in config.all_keys())
    assert cli.main(["presets"]) == 0
    listing = capsys.readouterr().out
    for name in config.preset_names():
        assert f"{name}:" in listing
    assert "gradient_checkpointing: true" in listing
    assert cli.main(["frobnicate"]) == 2


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "lora_booth", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("lora-booth ")


def test_toyworld_metrics_are_for_the_toy_world_only(capsys):
    assert cli.main(["eval", "lora=out/", "metrics=toyworld", "model=stable-diffusion-v1-5/stable-diffusion-v1-5"]) == 2
    assert "toy world" in capsys.readouterr().err
