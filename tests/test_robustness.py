"""Never lose a run: real child processes killed with SIGKILL at several points, then resumed,
give the adapter of an uninterrupted run bit for bit; hostile files and disks fail cleanly."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_booth import data
from lora_booth.errors import DataError
from lora_booth.recipe import TrainingError, run

from conftest import make_photo, make_photos, tiny_config

# Each fault is installed in the child before training starts, and SIGKILLs it at one moment.
FAULTS = {
    "between steps": """
        import lora_booth.recipe as target
        original = target.log_metrics
        def fault(metrics, step, *args):
            original(metrics, step, *args)
            if step == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        target.log_metrics = fault
    """,
    "inside a checkpoint write": """
        import lora_booth.checkpoint as target
        original, calls = target.atomic.save_safetensors, []
        def fault(final, tensors, metadata=None):
            calls.append(final)
            if len(calls) == 4:  # step 4's optimizer file: the adapter file is already in the staging folder
                partial = final.parent / f".{final.name}.killed.tmp"  # what atomic_path leaves mid-write
                partial.write_bytes(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            original(final, tensors, metadata)
        target.atomic.save_safetensors = fault
    """,
    "while drawing class images": """
        import lora_booth.prior as target
        original, calls = target.atomic.atomic_path, []
        import contextlib
        @contextlib.contextmanager
        def fault(final, *rest):
            with original(final, *rest) as temporary:
                yield temporary
                calls.append(final)
                if len(calls) == 2:  # the third image is written to its temporary name, not renamed
                    os.kill(os.getpid(), signal.SIGKILL)
        target.atomic.atomic_path = fault
    """,
    "while writing the final adapters": """
        import lora_booth.formats as target
        def fault(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        target.write_kohya = fault
    """,
}


def command_args(root, photos):
    return [f"instance_dir={photos}", "model=tiny", "instance_prompt=a photo of sks dog",
            "class_prompt=a photo of dog", f"class_dir={root / 'class'}", "num_class_images=4",
            "prior.sample_steps=2", f"output_dir={root / 'out'}", "resolution=32", "max_steps=6", "rank=2",
            "lr=1e-2", "train.device=cpu", "save.checkpoint_every=2", "train.grad_accum=2",
            "optim.schedule=cosine", "optim.warmup_steps=2", "lora.dropout=0.1", "data.flip=true"]


def launch(args, fault=""):
    script = "import os, signal\n" + textwrap.dedent(fault) + \
        "\nfrom lora_booth.cli import main\nraise SystemExit(main(%r))\n" % (["train", *args],)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    photos = make_photos(root)
    result = launch(command_args(root, photos))
    assert result.returncode == 0, result.stdout + result.stderr
    return photos, load_file(str(root / "out/pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("moment", list(FAULTS))
def test_sigkill_then_resume_is_bit_identical(tmp_path, uninterrupted, moment):
    photos, expected = uninterrupted
    args = command_args(tmp_path, photos)
    killed = launch(args, FAULTS[moment])
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    resumed = launch(args + ["resume=latest"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    tensors = load_file(str(tmp_path / "out/pytorch_lora_weights.safetensors"))
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in tensors), moment
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".lora-booth-tmp-")]
    assert not leftovers, leftovers  # the killed run's temporary files were swept on resume
    assert len(list((tmp_path / "out/checkpoints").glob("step-*"))) <= 2  # save.keep


# ------------------------------------------------------------------------------------ numerical faults


def test_nan_loss_stops_before_the_optimizer_step_or_is_skipped(tmp_path, photos, monkeypatch):
    from lora_booth import objective

    original = objective.dreambooth_loss

    def poisoned(pred, *args, **kwargs):
        losses = original(pred, *args, **kwargs)
        if poisoned.calls == 2:
            losses = objective.Losses(losses.total * float("nan"), losses.instance, losses.prior)
        poisoned.calls += 1
        return losses
    poisoned.calls = 0
    monkeypatch.setattr(objective, "dreambooth_loss", poisoned)
    with pytest.raises(TrainingError, match="step 3: the loss is nan"):
        run(tiny_config(tmp_path / "a", photos, max_steps=4), lambda *_: None)
    poisoned.calls = 0
    messages = []
    trained = run(tiny_config(tmp_path / "b", photos, max_steps=4, **{"train.on_nan": "skip"}), messages.append)
    assert any("step 3: non-finite loss" in m for m in messages)
    assert all(torch.isfinite(t).all() for t in load_file(str(trained.adapter)).values())


# ------------------------------------------------------------------------------------ disks


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, photos, monkeypatch):
    from lora_booth import checkpoint

    original = checkpoint.atomic.save_safetensors

    def full_at_step_two(final, tensors, metadata=None):
        if "step-00000002" in str(final) or ".step-00000002" in str(final):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(final, tensors, metadata)
    monkeypatch.setattr(checkpoint.atomic, "save_safetensors", full_at_step_two)
    with pytest.raises(TrainingError, match="No space left on device.*newest checkpoint on disk is .*step-00000001"):
        run(tiny_config(tmp_path, photos, max_steps=4, **{"save.checkpoint_every": 1}), lambda *_: None)
    folder = tmp_path / "out/checkpoints"
    assert [p.name for p in folder.iterdir()] == ["step-00000001"]   # no staging folder left behind
    checkpoint.verify(folder / "step-00000001")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_folder(tmp_path, photos):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DataError, match="permission denied"):
            run(tiny_config(tmp_path, photos, output_dir=locked / "out"), lambda *_: None)
    finally:
        locked.chmod(0o700)


def test_read_only_output_folder_as_root_too(tmp_path, photos, monkeypatch):
    """Root ignores permission bits, so the refusal itself is simulated at the write."""
    from lora_booth import atomic

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(atomic, "write_text", denied)
    with pytest.raises(DataError, match="permission denied"):
        run(tiny_config(tmp_path, photos), lambda *_: None)


# ------------------------------------------------------------------------------------ hostile images


def hostile(folder, name, content):
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        content(path)
    return path


def png_bytes(tmp_path):
    path = make_photo(tmp_path / "source.png", 0)
    data_bytes = path.read_bytes()
    path.unlink()
    return data_bytes


def jpeg_bytes(tmp_path):
    path = tmp_path / "source.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


@pytest.mark.parametrize("name,make,message", [
    ("empty.jpg", lambda tmp: b"", "cannot decode"),
    ("truncated.png", lambda tmp: png_bytes(tmp)[:60], "cannot decode"),
    ("truncated.jpg", lambda tmp: jpeg_bytes(tmp)[:400], "cannot decode"),
    ("notes.jpg", lambda tmp: b"this is a text file, not a photo\n", "cannot decode"),
    ("huge.png", None, "safety limit"),
])
def test_bad_image_files_are_named(tmp_path, photos, name, make, message, monkeypatch):
    if make is None:  # Pillow refuses images over 2× its limit; 400×400 is, the 80×64 photos are not
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
        make_photo(photos / name, 9, size=(400, 400))
    else:
        hostile(photos, name, make(tmp_path))
    with pytest.raises(DataError, match=rf"{name}.*{message}"):
        data.instance_rows(tiny_config(tmp_path, photos).data)


def test_odd_but_valid_images_train(tmp_path):
    """Unicode and spaces in paths, CMYK, 16-bit, palette with transparency, grey, EXIF-rotated, tiny."""
    folder = tmp_path / "fotos del perro – ñ"
    folder.mkdir()
    make_photo(folder / "cmyk photo.jpg", 1, mode="CMYK")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(folder / "deep.png")
    palette = Image.new("P", (40, 40), 3)
    palette.info["transparency"] = 3
    palette.save(folder / "palette.png", transparency=3)
    make_photo(folder / "grey.png", 2, mode="L")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 30), (200, 10, 10)).save(folder / "rotated.jpg", exif=exif)
    make_photo(folder / "small.png", 3, size=(16, 16))
    (folder / "small copy.png").write_bytes((folder / "small.png").read_bytes())
    (folder / ".hidden").write_bytes(b"ignored")
    messages = []
    trained = run(tiny_config(tmp_path, folder, max_steps=2), messages.append)
    assert trained.adapter.is_file()
    assert any("small.png is 16×16, smaller than data.resolution=32" in m for m in messages)
    assert any("small.png is a copy of small copy.png" in m for m in messages)
