"""Two CPU processes (gloo) under accelerate: the same training as one process with the same
global batch, files written once, a clean exit, and resume with another process count."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file


def train(tmp_path, photos, name, *extra):
    out = tmp_path / name
    command = [sys.executable, "-m", "lora_booth", "train", "model=tiny", f"instance_dir={photos}",
               "instance_prompt=a photo of sks dog", "class_prompt=a photo of dog", f"output_dir={out}",
               f"class_dir={tmp_path / 'class'}", "resolution=32", "rank=2", "num_class_images=4",
               "prior.sample_steps=2", "train.device=cpu", "sample.num=0", "lr=1e-2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout + result.stderr


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, photos):
    single, _ = train(tmp_path, photos, "one", "max_steps=4", "train.batch_size=2", "lora.text_encoder=true")
    double, log = train(tmp_path, photos, "two", "max_steps=4", "train.batch_size=1", "launch.processes=2",
                        "lora.text_encoder=true")  # both adapters synchronised across processes
    assert "processes    2; effective batch 2" in log and "not scaled" in log
    # the same rows, flips, noise and timesteps; only the order of float sums differs (DDP's mean
    # of two per-process means vs one mean): per-step losses agree to 1e-4 relative
    assert losses(double) == pytest.approx(losses(single), rel=1e-4)
    a, b = load_file(str(single / "pytorch_lora_weights.safetensors")), load_file(str(double / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    # files written once: one line per step, one set of outputs, one copy of each class image
    assert len(losses(double)) == 4
    assert sorted(p.name for p in double.iterdir()) == [
        "README.md", "config.yaml", "metrics.jsonl", "pytorch_lora_weights.safetensors", "report.html", "run.json",
        "two.safetensors"]
    assert len(list((tmp_path / "class").glob("*.png"))) == 4


def test_a_two_process_checkpoint_resumes_with_one_process(tmp_path, photos):
    out, _ = train(tmp_path, photos, "run", "max_steps=2", "save.checkpoint_every=2", "launch.processes=2")
    state = json.loads((out / "checkpoints/step-00000002/state.json").read_text())
    assert state["rows_done"] == 4  # 2 steps × 2 processes × batch 1
    _, log = train(tmp_path, photos, "run", "max_steps=4", "save.checkpoint_every=2", "resume=latest")
    assert "resumed from" in log and "at step 2" in log
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
