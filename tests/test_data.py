import numpy as np
import pytest
import torch
from PIL import Image

from lora_booth.families.latents import LatentCodec
from lora_booth.config import sections as config
from lora_booth.data import batches as data
from lora_booth.data import files
from lora_booth.data import crops as data_crops
from lora_booth.data import rows as data_rows
from lora_booth.io.errors import DataError

from conftest import make_photo


def data_config(folder, **overrides) -> config.DataConfig:
    cfg = config.DataConfig(instance_dir=str(folder), instance_prompt="a photo of sks dog", resolution=32)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with 'rotate 90°' in EXIF must train upright (portrait)."""
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 30, 30))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif)
    upright = files.load_rgb(path)
    assert upright.size == (30, 60)
    top = np.asarray(upright)[5, 15]
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK", "P", "LA"])
def test_other_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    make_photo(path, 0, mode=mode)
    assert files.load_rgb(path).mode == "RGB"


def test_transparent_pixels_become_white_not_black(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    assert np.asarray(files.load_rgb(path)).min() == 255


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    value = np.asarray(files.load_rgb(path))[0, 0, 0]
    assert 120 <= value <= 135  # half of 65535 → half of 255, not 255 (clipped)


def test_crop_shapes_range_flip_and_size_conditioning():
    image = Image.fromarray(np.tile(np.arange(80, dtype=np.uint8)[None, :, None] * 3, (40, 1, 3)))
    pixels, geometry = data_crops.fit_crop(image, (32, 32), "center", None, flip=False)
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    # 80×40 → 64×32: 32 spare columns, the centre crop starts at 16; SDXL's order is (h, w, top, left, h, w)
    assert geometry == (40, 80, 0, 16, 32, 32)
    flipped, flipped_geometry = data_crops.fit_crop(image, (32, 32), "center", None, flip=True)
    assert torch.equal(flipped, pixels.flip(-1)) and flipped_geometry == geometry  # centred: symmetric
    generator = torch.Generator().manual_seed(0)
    crops = {data_crops.fit_crop(image, (32, 32), "random", generator, False)[0][0, 0, 0].item() for _ in range(8)}
    assert len(crops) > 1  # random crops move


def test_captions_replace_the_instance_prompt(photos):
    (photos / "01.txt").write_text("a photo of sks dog on a beach\n")
    rows = data_rows.instance_rows(data_config(photos))
    prompts = {row.path.name: row.prompt for row in rows}
    assert prompts == {"00.png": "a photo of sks dog", "01.png": "a photo of sks dog on a beach",
                       "02.png": "a photo of sks dog"}


def test_empty_caption_is_an_error(photos):
    (photos / "00.txt").write_text("  \n")
    with pytest.raises(DataError, match="00.txt.*empty"):
        data_rows.instance_rows(data_config(photos))


def test_repeats_multiply_rows(photos):
    assert len(data_rows.instance_rows(data_config(photos, repeats=3))) == 9


def test_missing_empty_and_foreign_files_are_errors(tmp_path, photos):
    with pytest.raises(DataError, match="no such folder"):
        data_rows.instance_rows(data_config(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")  # hidden files are fine
    with pytest.raises(DataError, match="holds no images"):
        data_rows.instance_rows(data_config(empty))
    (photos / "IMG_0042.HEIC").write_bytes(b"not really")
    with pytest.raises(DataError, match="IMG_0042.HEIC"):
        data_rows.instance_rows(data_config(photos))


def test_undecodable_image_is_named(photos):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="broken.jpg: cannot decode"):
        data_rows.instance_rows(data_config(photos))


class FakeVae:
    """Deterministic 'encoder' (average pooling), so batches can be checked without a model."""
    dtype = torch.float32
    config = type("C", (), {"scaling_factor": 0.5})()

    def encode(self, pixels):
        pooled = torch.nn.functional.avg_pool2d(pixels, 4)
        mean = torch.cat([pooled, pooled[:, :1]], dim=1)
        dist = type("D", (), {"mean": mean, "std": torch.full_like(mean, 0.1)})()
        return type("O", (), {"latent_dist": dist})()


def make_batches(photos, classes=(), seed=0, cache=True, flip=False, batch_size=2, process=0, processes=1,
                 build=True):
    cfg = data_config(photos, flip=flip, cache_latents=cache)
    instances = data_rows.instance_rows(cfg)
    class_rows = data_rows.class_rows(list(classes), "a photo of dog")
    source = data.LatentSource(FakeVae(), cfg, torch.device("cpu"), seed, codec=LatentCodec(FakeVae().config))
    batches = data.DreamBoothBatches(instances, class_rows, source, batch_size=batch_size, seed=seed,
                                     process_index=process, num_processes=processes)
    if cache and build:
        source.build_cache(batches.every_latent())
    return batches


def test_batches_are_a_function_of_seed_and_step(photos):
    first, second = make_batches(photos), make_batches(photos)
    for step in (5, 0, 3):  # any order: a resumed run asks for step k directly
        a, b = first(step), second(step)
        assert torch.equal(a.latents, b.latents) and a.prompts == b.prompts
    other = make_batches(photos, seed=1)
    assert not torch.equal(first(0).latents, other(0).latents)


def test_each_epoch_visits_every_photo_once(photos):
    batches = make_batches(photos)
    seen = [row.path.name for step in range(3) for row, _ in batches._pick(batches.instances, "instance", step)]
    assert sorted(seen[:3]) == ["00.png", "01.png", "02.png"]
    assert sorted(seen[3:6]) == ["00.png", "01.png", "02.png"]


def test_prior_rows_follow_instance_rows(tmp_path, photos):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    classes = [make_photo(class_dir / f"c{i}.png", 10 + i) for i in range(5)]
    batch = make_batches(photos, classes)(0)
    assert batch.is_prior.tolist() == [False, False, True, True]
    assert batch.prompts[2:] == ["a photo of dog"] * 2
    assert batch.latents.shape == (4, 4, 8, 8)


def test_cached_and_uncached_latents_are_identical(photos):
    """The cache is an optimisation only: it must not change a single number."""
    cached, direct = make_batches(photos, cache=True, flip=True), make_batches(photos, cache=False, flip=True)
    for step in range(4):
        assert torch.allclose(cached(step).latents, direct(step).latents, atol=1e-6)


def test_processes_split_the_global_batch_exactly(tmp_path, photos):
    """Two processes at batch 1 see the rows, flips and latents of one process at batch 2."""
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    classes = [make_photo(class_dir / f"c{i}.png", 20 + i) for i in range(5)]
    single = make_batches(photos, classes, flip=True, batch_size=2)
    halves = [make_batches(photos, classes, flip=True, batch_size=1, process=p, processes=2) for p in range(2)]
    for step in range(4):
        whole, parts = single(step), [half(step) for half in halves]
        assert sorted(whole.slots) == sorted(parts[0].slots + parts[1].slots)
        by_slot = {slot: latent for part in parts for slot, latent in zip(part.slots, part.latents)}
        for slot, latent in zip(whole.slots, whole.latents):
            assert torch.equal(by_slot[slot], latent)


def test_a_run_caches_only_the_latents_it_reaches_and_encodes_the_rest_alike(tmp_path, photos):
    """A short run encodes what its steps draw, not every class image; a row beyond that (an
    update retried after a skip) is encoded when it comes, to the same numbers as a full cache."""
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    classes = [make_photo(class_dir / f"c{i}.png", 10 + i) for i in range(10)]
    full = make_batches(photos, classes, flip=True, batch_size=1)
    short = make_batches(photos, classes, flip=True, batch_size=1, build=False)
    reached = short.reachable(range(2))
    assert 2 <= len(reached) <= 4 and len(full.latent_source.cache) == len(full.every_latent()) == 2 * 13
    short.latent_source.build_cache(reached)
    assert set(short.latent_source.cache) == set(reached)
    assert short.reachable(range(10_000)) == full.every_latent()  # stops once every latent is reached
    for step in range(8):                                            # steps 2.. miss the cache
        a, b = full(step), short(step)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.sizes, b.sizes)
    assert len(short.latent_source.cache) > len(reached)
    short.latent_source.release(keep_on_cpu=False)
    with pytest.raises(RuntimeError, match="not cached"):
        short(10_000)
