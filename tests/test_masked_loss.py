"""Masked loss (data.masks, issue #18): a mask per instance photo, cut exactly as its photo,
averaged down to the latent grid, weighting the instance rows' loss; class rows never masked."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_booth.families.latents import LatentCodec
from lora_booth.config import sections as config
from lora_booth.config import loading
from lora_booth.data import batches as data, masks
from lora_booth.data import rows as data_rows
from lora_booth.data import crops
from lora_booth.data import files
from lora_booth.model import objective
from lora_booth.io.errors import ConfigError, DataError
from lora_booth.training.recipe import run

from conftest import make_photo, make_photos, run_until_first_checkpoint, tiny_config

MASKED = {"data.masks": "files"}


def quiet(*_):
    pass


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def draw_masks(photos, seed=0):
    """A random grayscale mask (0 … 255, a white block in it) beside each photo."""
    rng = np.random.default_rng(seed)
    for photo in sorted(photos.glob("*.png")):
        with Image.open(photo) as image:
            width, height = image.size
        mask = rng.integers(0, 256, (height, width), dtype=np.uint8)
        mask[height // 4: height // 2, width // 4: width // 2] = 255
        Image.fromarray(mask, "L").save(masks.mask_file(photo))
    return photos


def data_config(folder, **overrides) -> config.DataConfig:
    cfg = config.DataConfig(instance_dir=str(folder), instance_prompt="a photo of sks dog", resolution=32)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


# ---------------------------------------------------------------------------------------- the loss


def test_the_masked_loss_by_hand():
    """Each instance row: Σ w·(ŷ − y)² / Σ w, w = m + u·(1 − m) on the latent grid, shared by the
    channels; class rows the plain mean whatever mask they are handed; then instance + λ·prior."""
    torch.manual_seed(0)
    pred, target = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    mask = torch.tensor([[[1.0, 0.0], [0.5, 0.0]], [[0.0, 0.0], [0.0, 0.25]], [[0.0, 0.0], [0.0, 0.0]]])[:, None]
    is_prior = torch.tensor([False, False, True])
    u = 0.1
    losses = objective.dreambooth_loss(pred, target, is_prior, 0.5, mask=objective.mask_weights(mask, u))

    def row_loss(row, masked):
        numerator = denominator = 0.0
        for channel in range(2):
            for y in range(2):
                for x in range(2):
                    w = float(mask[row, 0, y, x]) + u * (1 - float(mask[row, 0, y, x])) if masked else 1.0
                    numerator += w * (float(pred[row, channel, y, x]) - float(target[row, channel, y, x])) ** 2
                    denominator += w
        return numerator / denominator
    instance = (row_loss(0, True) + row_loss(1, True)) / 2
    prior = row_loss(2, False)
    assert losses.instance.item() == pytest.approx(instance, rel=1e-6)
    assert losses.prior.item() == pytest.approx(prior, rel=1e-6)
    assert losses.total.item() == pytest.approx(instance + 0.5 * prior, rel=1e-6)


def test_the_scale_does_not_depend_on_the_subjects_area_and_ones_are_no_mask():
    """A uniform residual gives the same loss under a small or a large subject (normalised by
    Σ w); an all-ones mask is the unmasked loss; with huber and min-SNR weights too."""
    pred = torch.zeros(2, 4, 4, 4)
    target = torch.full((2, 4, 4, 4), 0.5)
    small, large = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    small[..., 0, 0], large[..., :3, :] = 1, 1
    is_prior = torch.tensor([False, False])
    losses = objective.dreambooth_loss(pred, target, is_prior, 1.0, mask=torch.cat([small, large]))
    plain = objective.dreambooth_loss(pred, target, is_prior, 1.0)
    assert losses.instance.item() == pytest.approx(plain.instance.item())
    torch.manual_seed(1)
    pred, target = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    is_prior = torch.tensor([False, True, False, True])
    weights, c = torch.rand(4) + 0.5, torch.rand(4) * 0.2 + 0.05
    ones = objective.dreambooth_loss(pred, target, is_prior, 1.0, weights, "huber", c, mask=torch.ones(4, 1, 3, 3))
    unmasked = objective.dreambooth_loss(pred, target, is_prior, 1.0, weights, "huber", c)
    assert all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(ones, unmasked))
    empty = objective.dreambooth_loss(pred, target, torch.tensor([False] * 4), 1.0, mask=torch.zeros(4, 1, 3, 3))
    assert empty.total.item() == 0.0  # a crop without subject or background weight: 0, never 0/0


# ---------------------------------------------------------------------------- a mask and its photo


class PoolingVae:
    """A deterministic 'encoder' (4×4 average pooling, no noise), so latents show the pixels."""
    dtype = torch.float32
    config = type("C", (), {"scaling_factor": 1.0})()

    def encode(self, pixels):
        pooled = torch.nn.functional.avg_pool2d(pixels, 4)
        mean = torch.cat([pooled, pooled[:, :1]], dim=1)
        dist = type("D", (), {"mean": mean, "std": torch.zeros_like(mean)})()
        return type("O", (), {"latent_dist": dist})()


def red_channel_masks(photos):
    """Each photo's mask is its own red channel: the cut mask must equal the cut photo's red."""
    for photo in sorted(photos.glob("*.png")):
        with Image.open(photo) as image:
            image.convert("RGB").getchannel("R").save(masks.mask_file(photo))


@pytest.mark.parametrize("crop, flip, buckets, cache", [("center", False, False, True), ("center", True, False, True),
                                                         ("random", True, False, False), ("center", True, True, True),
                                                         ("random", True, True, False)])
def test_a_mask_is_cut_exactly_as_its_photo(tmp_path, crop, flip, buckets, cache):
    """Pixel for pixel: the same resize, crop, flip and bucket, through the run's own path (the
    photos are 80×64 and 48×80, so every crop and bucket moves something)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, size in enumerate([(80, 64), (48, 80), (80, 64)]):
        make_photo(photos / f"{index:02d}.png", index, size=size)
    red_channel_masks(photos)
    cfg = data_config(photos, masks="files", crop=crop, flip=flip, buckets=buckets, bucket_step=8,
                      cache_latents=cache)
    instances = data_rows.instance_rows(cfg, quiet)
    placement = crops.place((80, 64), (32, 32), crop, torch.Generator().manual_seed(3), flip)
    with Image.open(photos / "00.png") as photo:
        cut = np.asarray(placement.apply(photo.convert("RGB")))
        assert np.array_equal(np.asarray(placement.apply(masks.load(photos / "00.png", "files", photo.size))),
                              cut[..., 0])
    source = data.LatentSource(PoolingVae(), cfg, torch.device("cpu"), seed=0, masked={r.path for r in instances}, codec=LatentCodec(PoolingVae().config))
    batches = data.DreamBoothBatches(instances, [], source, batch_size=1, seed=0)
    if cache:
        source.build_cache(batches.every_latent())
    for step in range(6):
        batch = batches(step)
        red = batch.latents[:, :1]            # the pooled red channel, in [-1, 1]
        assert batch.masks.shape == red.shape
        assert torch.allclose(batch.masks, (red + 1) / 2, atol=1e-6)


def test_cached_and_uncached_masks_are_bit_identical(tmp_path, photos):
    draw_masks(photos)
    grids = []
    for cache in (True, False):
        cfg = data_config(photos, masks="files", flip=True, cache_latents=cache)
        instances = data_rows.instance_rows(cfg, quiet)
        source = data.LatentSource(PoolingVae(), cfg, torch.device("cpu"), seed=0, masked={r.path for r in instances}, codec=LatentCodec(PoolingVae().config))
        batches = data.DreamBoothBatches(instances, [], source, batch_size=2, seed=0)
        if cache:
            source.build_cache(batches.every_latent())
        grids.append([batches(step).masks for step in range(4)])
    assert all(torch.equal(a, b) for a, b in zip(*grids))


def test_alpha_masks_are_the_photos_alpha_channel(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    cfg = data_config(folder, masks="alpha")
    (row,) = data_rows.instance_rows(cfg, quiet)
    assert row.mask == folder / "a.png"
    assert np.array_equal(np.asarray(masks.load(row.path, "alpha", (40, 40))), rgba[..., 3])
    make_photo(folder / "b.png", 1)
    with pytest.raises(DataError, match="b.png: has no alpha channel"):
        data_rows.instance_rows(cfg, quiet)


# ----------------------------------------------------------------------------- files and mistakes


def test_mask_files_are_never_photos_and_kohya_folders_keep_working(tmp_path):
    photos = make_photos(tmp_path)
    kohya = photos / "2_sks dog"
    kohya.mkdir()
    make_photo(kohya / "k.png", 7)
    draw_masks(photos)
    draw_masks(kohya)
    names = [path.relative_to(photos).as_posix() for path in files.image_paths(photos, "data.instance_dir")]
    assert names == ["00.png", "01.png", "02.png", "2_sks dog/k.png"]
    rows = data_rows.instance_rows(data_config(photos, masks="files"), quiet)
    assert {row.mask.name for row in rows} == {"00.mask.png", "01.mask.png", "02.mask.png", "k.mask.png"}
    warnings = []
    assert all(row.mask is None for row in data_rows.instance_rows(data_config(photos), warnings.append))
    assert any("4 photos have a .mask.png" in w and "data.masks=files" in w for w in warnings)
    toml = tmp_path / "dataset.toml"
    body = f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{photos.as_posix()}"\n  alpha_mask = true\n'
    toml.write_text(body)
    cfg, _ = loading.resolve({"model": "tiny", "dataset": str(toml), "output_dir": str(tmp_path / "out"),
                             "prior_weight": "0"})
    assert cfg.data.masks == "alpha" and cfg.data.instance_prompt == "sks dog"
    toml.write_text(body + f'  [[datasets.subsets]]\n  is_reg = true\n  image_dir = "{tmp_path.as_posix()}"\n'
                    "  alpha_mask = true\n")
    with pytest.raises(ConfigError, match="alpha_mask.*never masks"):
        loading.resolve({"model": "tiny", "dataset": str(toml), "output_dir": str(tmp_path / "out")})


def test_bad_masks_are_errors_that_name_the_file(tmp_path, photos):
    cfg = data_config(photos, masks="files")
    draw_masks(photos)
    (photos / "01.mask.png").unlink()
    (photos / "02.mask.png").unlink()
    with pytest.raises(DataError, match=r"2 of 3 photos have no mask beside them \(01.png, 02.png\).*01.mask.png"):
        data_rows.instance_rows(cfg, quiet)
    Image.new("L", (10, 10), 255).save(photos / "01.mask.png")
    (photos / "02.mask.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"01.mask.png: 10×10 pixels, but its photo 01.png is 80×64"):
        data_rows.instance_rows(cfg, quiet)
    Image.new("L", (80, 64), 0).save(photos / "01.mask.png")
    with pytest.raises(DataError, match="01.mask.png: the mask is black"):
        data_rows.instance_rows(cfg, quiet)
    Image.new("L", (80, 64), 255).save(photos / "01.mask.png")
    with pytest.raises(DataError, match="02.mask.png: cannot decode this mask"):
        data_rows.instance_rows(cfg, quiet)
    (photos / "02.mask.png").unlink()
    Image.new("L", (80, 64), 255).save(photos / "02.mask.jpg")
    with pytest.raises(DataError, match=r"02.mask.jpg: a mask is read from a PNG only.*02.mask.png"):
        data_rows.instance_rows(cfg, quiet)
    base = {"model": "tiny", "instance_dir": "x", "instance_prompt": "a photo of sks dog",
            "class_prompt": "a photo of dog", "output_dir": "x"}
    for pairs, message in [({"objective.unmasked_weight": "0.2"}, "does nothing while data.masks=none"),
                           ({"data.mask_dropout": "0.1"}, "does nothing while data.masks=none"),
                           ({"data.masks": "alpha", "objective.unmasked_weight": "2"}, "between 0 and 1"),
                           ({"data.masks": "file"}, "must be one of none, files, alpha")]:
        with pytest.raises(ConfigError, match=message):
            loading.resolve({**base, **pairs})


def test_masks_count_in_the_data_fingerprint(tmp_path, photos):
    plain = data_rows.fingerprint(data_rows.instance_rows(data_config(photos), quiet), [])
    assert set(plain) == {"instance", "class"}            # fingerprints of runs without masks are unchanged
    draw_masks(photos)
    cfg = data_config(photos, masks="files")
    before = data_rows.fingerprint(data_rows.instance_rows(cfg, quiet), [])
    draw_masks(photos, seed=1)
    after = data_rows.fingerprint(data_rows.instance_rows(cfg, quiet), [])
    assert before["instance"] == after["instance"]
    assert data_rows.fingerprint_changes(before, after) == ["mask 00.mask.png changed", "mask 01.mask.png changed",
                                                       "mask 02.mask.png changed"]


# ------------------------------------------------------------------------------------------- runs


def test_a_masked_run_weights_instance_rows_only_and_says_so(tmp_path, photos, monkeypatch):
    """The loss hears each instance row's mask on the latent grid and ones on the class rows; the
    card and the adapter's metadata say the loss was masked. A background weight of 1 trains
    exactly as no mask (to rounding), and so does a mask dropout of 1."""
    draw_masks(photos)
    seen = []
    loss = objective.dreambooth_loss

    def watched(pred, target, is_prior, *args, **kwargs):
        seen.append((pred.shape, is_prior.clone(), args[-1].clone()))
        return loss(pred, target, is_prior, *args, **kwargs)
    monkeypatch.setattr(objective, "dreambooth_loss", watched)
    trained = run(tiny_config(tmp_path / "a", photos, **MASKED, max_steps=2), quiet)
    monkeypatch.undo()
    for shape, is_prior, mask in seen:
        assert mask.shape == (2, 1, *shape[-2:]) and torch.equal(mask[is_prior], torch.ones_like(mask[is_prior]))
        assert 0 <= mask.min() and mask[~is_prior].max() <= 1 and not torch.equal(mask[~is_prior], mask[is_prior])
    with safe_open(str(trained.adapter), "pt") as f:
        assert json.loads(f.metadata()["lora_booth.config"])["data"]["masks"] == "files"
    assert "masked loss (mask files, background weight 0)" in (tmp_path / "a/out/README.md").read_text()

    run(tiny_config(tmp_path / "b", photos, max_steps=3), quiet)
    run(tiny_config(tmp_path / "c", photos, **MASKED, max_steps=3, **{"objective.unmasked_weight": 1}), quiet)
    run(tiny_config(tmp_path / "d", photos, **MASKED, max_steps=3, **{"data.mask_dropout": 1}), quiet)
    plain = [r["loss"] for r in metrics(tmp_path / "b/out")]
    for other in "cd":
        assert [r["loss"] for r in metrics(tmp_path / other / "out")] == pytest.approx(plain, rel=1e-5)


def test_resume_with_masks_is_bit_exact(tmp_path, photos, monkeypatch):
    """Mask dropout from the rows' own streams, masks cached with the latents: a resumed run ends
    on the very tensors and losses of an uninterrupted one (validation on as well)."""
    draw_masks(photos)
    common = dict(max_steps=4, **MASKED, **{"save.checkpoint_every": 2, "train.grad_accum": 2, "data.flip": "true",
                                            "data.mask_dropout": 0.5, "objective.unmasked_weight": 0.1,
                                            "validate.every": 1, "lora.dropout": 0.1})
    straight = run(tiny_config(tmp_path / "a", photos, **common), quiet)
    run_until_first_checkpoint(tiny_config(tmp_path / "b", photos, **common), monkeypatch)
    resumed = run(tiny_config(tmp_path / "b", photos, **common, resume="latest"), quiet)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def logged(folder):
        return [{k: v for k, v in record.items() if k != "step_seconds"} for record in metrics(folder / "out")]
    assert logged(tmp_path / "a") == logged(tmp_path / "b") and "val_instance_loss" in logged(tmp_path / "a")[-1]
