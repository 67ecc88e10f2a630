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


# Run under torchrun: the training of `lora-booth train ARGS...`, counting each trained model's
# gradient all-reduces (a DDP comm hook sees every bucket; the last bucket closes one round).
COUNTING_RUNNER = """
import json, os, sys
import torch
from lora_booth import cli
from lora_booth.training import recipe

rounds = {}
prepare = recipe.prepare_optimization

def counted(*args):
    setup = prepare(*args)
    for index, model in enumerate(setup.trained_models):
        def hook(state, bucket, index=index):
            if bucket.is_last():
                rounds[index] = rounds.get(index, 0) + 1
            buffer = bucket.buffer().div_(torch.distributed.get_world_size())
            return torch.distributed.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])
        model.register_comm_hook(None, hook)
    return setup

recipe.prepare_optimization = counted
code = cli.main(["train", *sys.argv[2:]])
with open(f"{sys.argv[1]}.{os.environ['RANK']}", "w") as handle:
    json.dump({"code": code, "rounds": rounds}, handle)
"""


def train_counting_all_reduces(tmp_path, photos, name, *extra):
    """Two machines of one process each, as torchrun starts them (two node ranks meeting over the
    loopback interface, no relaunch); each trained model's all-reduce rounds, per process."""
    import socket

    out = tmp_path / name
    runner = tmp_path / "runner.py"
    runner.write_text(COUNTING_RUNNER)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = []
    for node in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), str(runner),
                   str(tmp_path / "rounds"), "model=tiny", f"instance_dir={photos}",
                   "instance_prompt=a photo of sks dog", "class_prompt=a photo of dog", f"output_dir={out}",
                   f"class_dir={tmp_path / 'class'}", "resolution=32", "rank=2", "num_class_images=4",
                   "prior.sample_steps=2", "train.device=cpu", "sample.num=0", "lr=1e-2", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-3000:] for log in logs)
    counts = [json.loads((tmp_path / f"rounds.{rank}").read_text()) for rank in (0, 1)]
    return out, "".join(logs), counts


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, photos):
    """Run as two machines over loopback. Also: each trained model (UNet and text encoder)
    all-reduces its gradients once per optimizer step, not once per micro-batch or per split-prior pass."""
    keys = ("max_steps=4", "lora.text_encoder=true", "train.split_prior=true", "train.grad_accum=2")
    single, _ = train(tmp_path, photos, "one", "train.batch_size=2", *keys)
    double, log, counts = train_counting_all_reduces(tmp_path, photos, "two", "train.batch_size=1", *keys)
    assert "processes    2; effective batch 4" in log and "not scaled" in log
    assert all(c["code"] == 0 for c in counts)
    assert [c["rounds"] for c in counts] == [{"0": 4, "1": 4}] * 2, counts  # 4 steps: 4 rounds per model
    # the same rows, flips, noise and timesteps; only the order of float sums differs (DDP's mean
    # of two per-process means vs one mean): per-step losses agree to 1e-4 relative
    assert losses(double) == pytest.approx(losses(single), rel=1e-4)
    a, b = load_file(str(single / "pytorch_lora_weights.safetensors")), load_file(str(double / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    # files written once: one line per step, one set of outputs, one copy of each class image
    assert len(losses(double)) == 4
    assert sorted(p.name for p in double.iterdir()) == [
        ".lora-booth-files", "README.md", "checkpoints", "config.yaml", "metrics.jsonl", "pytorch_lora_weights.safetensors", "report.html",
        "run.json",
        "sks_dog.safetensors"]
    assert len(list((tmp_path / "class").glob("*.png"))) == 4


def test_a_two_process_checkpoint_resumes_with_one_process(tmp_path, photos):
    out, _ = train(tmp_path, photos, "run", "max_steps=2", "save.checkpoint_every=2", "launch.processes=2")
    state = json.loads((out / "checkpoints/step-00000002/state.json").read_text())
    assert state["rows_done"] == 4  # 2 steps × 2 processes × batch 1
    _, log = train(tmp_path, photos, "run", "max_steps=4", "save.checkpoint_every=2", "resume=latest")
    assert "resumed from" in log and "at step 2" in log
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
