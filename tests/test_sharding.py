"""launch.sharding=fsdp: two CPU processes (gloo) with the frozen denoiser sharded by FSDP2 train
the adapter that one process trains with the same global batch; files written once."""
import pytest
from safetensors.torch import load_file

from lora_booth.io.errors import ConfigError, LoraBoothError

from conftest import tiny_config
from test_distributed import losses, train


def test_two_sharded_processes_train_like_one(tmp_path, photos):
    keys = ("max_steps=2", "train.grad_accum=2", "train.gradient_checkpointing=true", "optim.max_grad_norm=1")
    single, _ = train(tmp_path, photos, "one", "train.batch_size=2", *keys)
    sharded, log = train(tmp_path, photos, "two", "train.batch_size=1", "launch.processes=2",
                         "launch.sharding=fsdp", *keys)
    assert "processes    2; effective batch 4" in log
    # each process holds half of the frozen weights (a parameter split unevenly rounds up)
    holds = [line for line in log.splitlines() if line.startswith("sharding     fsdp across 2 processes")]
    assert len(holds) == 1, log[-3000:]  # reported by the main process only
    percent = int(holds[0].rsplit("(", 1)[1].split(" %")[0])
    assert 45 <= percent <= 55, holds
    # the same rows, noise and timesteps; FSDP only changes where the frozen weights live, so the
    # numbers differ by the order of float sums (the mean of two per-process means vs one mean, and
    # the all-reduce's sum): the same 1e-4 the unsharded two-process test allows
    assert losses(sharded) == pytest.approx(losses(single), rel=1e-4)
    assert len(losses(sharded)) == 2  # one line per step: written once
    a = load_file(str(single / "pytorch_lora_weights.safetensors"))
    b = load_file(str(sharded / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    # Adam divides each gradient element by its own running size, so an element whose gradient is
    # near zero turns that float-order difference into up to one step of lr (1e-2) = 3.8e-4 measured;
    # a tenth of one step still catches processes that train apart (they would differ by steps)
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-3), key


@pytest.mark.parametrize("pairs, key", [
    ({"train.base_weights": "fp8", "train.mixed_precision": "bf16"}, "train.base_weights"),
    ({"train.offload_blocks": "2"}, "train.offload_blocks"),
    ({"lora.text_encoder": "true"}, "lora.text_encoder"),
    ({"sample.num": "2"}, "sample.num"),
])
def test_sharding_refuses_what_it_does_not_shard(tmp_path, photos, pairs, key):
    with pytest.raises(LoraBoothError) as caught:
        tiny_config(tmp_path, photos, **{"launch.processes": 2, "launch.sharding": "fsdp", **pairs})
    assert key in str(caught.value) and "launch.sharding=fsdp" in str(caught.value)


def test_sharding_in_one_process_is_refused(tmp_path, photos):
    from lora_booth.training import preparation

    cfg = tiny_config(tmp_path, photos, **{"launch.sharding": "fsdp"})
    with pytest.raises(ConfigError, match="launch.processes=2 or more"):
        preparation.make_accelerator(cfg)
