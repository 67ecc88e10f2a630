"""Aspect-ratio buckets: the sizes, the assignment, batches within one bucket, and training."""

import pytest
import torch

from lora_booth.families.latents import LatentCodec
from lora_booth.data import buckets, batches as data
from lora_booth.data import rows
from lora_booth.config import sections as config
from lora_booth.io import errors
from lora_booth.config import loading
from lora_booth.training.recipe import run

from conftest import make_photo, tiny_config
from test_data import FakeVae


def test_bucket_sizes_keep_the_pixel_budget_and_the_step():
    sizes = buckets.bucket_sizes(512, 64, 2.0)
    assert (512, 512) in sizes and (576, 448) in sizes and (448, 576) in sizes
    assert (704, 320) not in sizes  # 2.2:1 is past the ratio limit
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 512 * 512 and width * height >= 0.75 * 512 * 512
        assert max(width, height) / min(width, height) <= 2.0


@pytest.mark.parametrize("photo,bucket", [((4000, 3000), (576, 448)), ((3000, 4000), (448, 576)),
                                          ((1920, 1080), (640, 384)), ((1000, 1000), (512, 512)),
                                          ((5000, 1000), (768, 320))])
def test_each_photo_goes_to_the_bucket_nearest_its_aspect_ratio(photo, bucket):
    assert buckets.nearest_bucket(*photo, buckets.bucket_sizes(512, 64, 2.5)) == bucket


def test_epoch_groups_stay_in_one_bucket_and_drop_no_photo():
    sizes = [(64, 32)] * 3 + [(32, 32)] * 1 + [(32, 64)] * 4
    shuffle = lambda name, n: list(range(n))[::-1]  # noqa: E731 — any permutation will do
    groups = buckets.epoch_groups(sizes, 2, shuffle)
    assert len(groups) == buckets.group_count(sizes, 2) == 2 + 1 + 2
    assert all(len({sizes[i] for i in group}) == 1 and len(group) == 2 for group in groups)
    assert {i for group in groups for i in group} == set(range(8))


def mixed_photos(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index, size in enumerate([(96, 48), (100, 52), (40, 80), (64, 64), (48, 96)]):
        make_photo(folder / f"{index:02d}.png", index, size=size)
    return folder


def bucketed(folder, class_paths=(), batch_size=2, process=0, processes=1, cache=True, flip=True, seed=0):
    cfg = config.DataConfig(instance_dir=str(folder), instance_prompt="a photo of sks dog", resolution=32,
                            buckets=True, bucket_step=8, flip=flip, cache_latents=cache)
    instances = rows.instance_rows(cfg)
    source = data.LatentSource(FakeVae(), cfg, torch.device("cpu"), seed, codec=LatentCodec(FakeVae().config))
    batches = data.DreamBoothBatches(instances, rows.class_rows(list(class_paths), "a photo of dog"), source,
                                     batch_size, seed, process, processes)
    if cache:
        source.build_cache(batches.every_latent())
    return batches


def test_batches_come_from_one_bucket_and_class_rows_follow_it(tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    classes = [make_photo(class_dir / f"c{i}.png", 10 + i, size=(32, 32)) for i in range(3)]
    batches = bucketed(mixed_photos(tmp_path), classes)
    assert [row.size for row in batches.instances] == [(40, 24), (40, 24), (24, 40), (32, 32), (24, 40)]
    shapes = set()
    for step in range(12):
        batch = batches(step)
        shapes.add(tuple(batch.latents.shape[2:]))
        assert batch.is_prior.tolist() == [False, False, True, True]
        height, width = batch.latents.shape[2] * 4, batch.latents.shape[3] * 4  # FakeVae pools by 4
        assert batch.sizes[:, 4:].tolist() == [[height, width]] * 4  # every row cut to the batch's bucket
    assert shapes == {(6, 10), (10, 6), (8, 8)}


def test_bucketed_batches_are_deterministic_cache_free_and_split_across_processes(tmp_path):
    folder = mixed_photos(tmp_path)
    single, again = bucketed(folder), bucketed(folder)
    uncached = bucketed(folder, cache=False)
    halves = [bucketed(folder, batch_size=1, process=p, processes=2) for p in range(2)]
    for step in range(8):
        whole = single(step)
        assert torch.equal(whole.latents, again(step).latents) and whole.slots == again(step).slots
        assert torch.allclose(whole.latents, uncached(step).latents, atol=1e-6)
        parts = [half(step) for half in halves]
        assert whole.slots == parts[0].slots + parts[1].slots
        assert torch.equal(whole.latents, torch.cat([parts[0].latents, parts[1].latents]))
    assert not torch.equal(single(0).latents, bucketed(folder, seed=1)(0).latents)


def test_a_bad_bucket_step_is_refused(photos):
    with pytest.raises(errors.ConfigError, match="data.bucket_step"):
        loading.resolve({"instance_dir": str(photos), "instance_prompt": "a sks dog", "resolution": "96",
                        "data.buckets": "true", "data.bucket_step": "64", "prior.weight": "0"})


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_training_with_buckets_and_prior_preservation(tmp_path, model):
    lines = []
    cfg = tiny_config(tmp_path, mixed_photos(tmp_path), model=model, max_steps=3,
                      **{"data.buckets": "true", "data.bucket_step": "8"})
    result = run(cfg, lines.append)
    assert result.adapter.is_file() and result.step == 3
    assert "buckets      24×40: 2, 32×32: 1, 40×24: 2 (width×height: instance rows)" in lines


def test_a_bucket_step_the_unet_cannot_take_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, mixed_photos(tmp_path), resolution=40, **{"data.buckets": "true",
                                                                          "data.bucket_step": "4"})
    with pytest.raises(errors.ConfigError, match="multiple of 8"):
        run(cfg, lambda *_: None)
