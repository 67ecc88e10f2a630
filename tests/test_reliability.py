"""Never lose or corrupt a user's work (issue #22): lora-booth removes only what it wrote, one
process per output, a safe end of run, resume on the same data only, no silent overwrite,
hostile photo folders, umask modes, and messages instead of tracebacks."""
import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_booth.io import atomic, locking
from lora_booth.model import checkpoint
from lora_booth import cli
from lora_booth.data import batches as data
from lora_booth.data import rows as data_rows
from lora_booth.data import files
from lora_booth.adapters import merging
from lora_booth.io.errors import ConfigError, DataError, WriteError
from lora_booth.training.recipe import run

from conftest import make_photo, tiny_config
from lora_booth.config import loading


def quiet(*_):
    pass


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------ 1. deletes only what it wrote


def test_the_stale_sweep_removes_only_lora_booths_leftovers_of_dead_processes(tmp_path):
    users = [tmp_path / ".notes.tmp", tmp_path / ".draft.tmp"]
    users[0].write_text("mine")
    users[1].mkdir()
    dead = tmp_path / f"{atomic.TEMP_PREFIX}{dead_pid()}-adapter.safetensors-x1"
    dead.write_bytes(b"half")
    staging = tmp_path / f"{atomic.TEMP_PREFIX}{dead_pid()}-step-00000002-x2"
    staging.mkdir()
    (staging / "adapter.safetensors").write_bytes(b"half")
    live = tmp_path / f"{atomic.TEMP_PREFIX}{os.getpid()}-config.yaml-x3"   # a running writer's
    live.write_text("in progress")
    assert sorted(atomic.sweep_stale(tmp_path)) == sorted([dead, staging])
    assert all(p.exists() for p in users + [live])


def test_overwrite_removes_the_previous_run_and_nothing_else(tmp_path, photos):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    mine = [out / "checkpoints" / "my-notes.txt", out / "my-model.safetensors", out / "samples-by-me" / "a.png"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the user's")
    keys = {"max_steps": 2, "sample.num": 1, "sample.steps": 2}
    run(tiny_config(tmp_path, photos, **keys), quiet)
    assert (out / "samples/step-00000002.png").is_file() and (out / "checkpoints/step-00000002").is_dir()
    run(tiny_config(tmp_path, photos, overwrite="true", **{**keys, "max_steps": 1}), quiet)
    assert all(path.read_bytes() == b"the user's" for path in mine)
    assert not (out / "samples/step-00000002.png").exists()            # the old run's grid went
    assert not (out / "checkpoints/step-00000002").exists()
    assert (out / "checkpoints/step-00000001/state.json").is_file()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("where", ["the photos", "above the photos", "the class images"])
def test_an_output_folder_among_the_inputs_is_refused_before_anything_is_written(tmp_path, photos, where):
    before = sorted(p.name for p in photos.iterdir())
    out = {"the photos": photos, "above the photos": tmp_path, "the class images": tmp_path / "class"}[where]
    (tmp_path / "class").mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match="save.output_dir"):
        run(tiny_config(tmp_path, photos, output_dir=out, **{"prior.class_dir": tmp_path / "class"}), quiet)
    assert sorted(p.name for p in photos.iterdir()) == before
    assert not (tmp_path / "config.yaml").exists() and not list((tmp_path / "class").iterdir())


def test_merge_overwrite_never_deletes_a_folder_it_did_not_write(tmp_path):
    folder = tmp_path / "models"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.safetensors").write_bytes(b"the user's")
    with pytest.raises(merging.MergeError, match="did not write"):
        merging.remove_replaced_folder(folder)
    assert (folder / "unet" / "weights.safetensors").is_file()


# ------------------------------------------------------------------ 2. one process per output


def test_a_second_writer_is_refused_and_told_who_holds_the_lock(tmp_path, photos):
    out = tmp_path / "out"
    with locking.exclusive(out, "train"):
        with pytest.raises(locking.LockedError, match=f"pid {os.getpid()}, lora-booth train"):
            run(tiny_config(tmp_path, photos), quiet)
        assert cli.main(["convert", f"in={tmp_path}/none.safetensors", "to=kohya", f"out={out}"]) == 1
    assert not locking.lock_path_for(out).exists()   # released and removed


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out.safetensors"
    script = (f"import os, signal\nfrom lora_booth.io import locking\nwith locking.exclusive({str(out)!r}, 'merge'):\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    with locking.exclusive(out, "merge"):   # the kernel dropped the dead process's lock
        pass


# ------------------------------------------------------------------ 3. the end of a run is safe


def test_a_full_disk_at_the_final_save_keeps_the_run_and_resume_finishes_it(tmp_path, photos, monkeypatch):
    original = atomic.save_safetensors

    def full(final, tensors, metadata=None):
        if os.path.basename(str(final)) == "pytorch_lora_weights.safetensors" and "checkpoints" not in str(final):
            raise atomic.write_error(final, OSError(28, "No space left on device"), 3 * 2**20)
        return original(final, tensors, metadata)
    monkeypatch.setattr(atomic, "save_safetensors", full)
    with pytest.raises(WriteError, match=r"disk is full.*free on that disk.*resume=latest"):
        run(tiny_config(tmp_path, photos, max_steps=3), quiet)
    out = tmp_path / "out"
    assert checkpoint.verify(out / "checkpoints/step-00000003")["step"] == 3
    monkeypatch.undo()
    messages = []
    finished = run(tiny_config(tmp_path, photos, max_steps=3, resume="latest"), messages.append)
    assert finished.adapter.is_file() and not any(m.startswith("trained ") for m in messages)


# ------------------------------------------------------------------ 4. resume on the same data only


def test_resume_refuses_changed_photos_and_names_them(tmp_path, photos):
    run(tiny_config(tmp_path, photos, max_steps=2), quiet)
    make_photo(photos / "01.png", 99)                        # edited
    make_photo(photos / "03.png", 3)                         # added
    with pytest.raises(ConfigError, match="instance 03.png added.*instance 01.png changed"):
        run(tiny_config(tmp_path, photos, max_steps=3, resume="latest"), quiet)
    resumed = run(tiny_config(tmp_path, photos, max_steps=3, resume="latest",
                              **{"train.resume_changed_data": "true"}), quiet)
    assert resumed.step == 3


# ------------------------------------------------------------------ 5. no silent overwrite


def test_generate_refuses_to_replace_images(tmp_path):
    from lora_booth.results import sample

    (tmp_path / "0000.png").write_bytes(b"the user's picture")
    with pytest.raises(ConfigError, match="already holds 0000.png.*overwrite=true"):
        sample.generate("tiny", [], "a dog", tmp_path, n=2, steps=1, report=quiet)
    assert (tmp_path / "0000.png").read_bytes() == b"the user's picture"


# ------------------------------------------------------------------ 9. hostile photo folders


def test_photo_folders_refuse_pipes_extreme_shapes_and_undecodable_captions(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    make_photo(folder / "a.png", 0)
    os.mkfifo(folder / "zz.jpg")
    with pytest.raises(DataError, match="zz.jpg: not a regular file"):
        files.list_images(folder, "data.instance_dir")              # returns at once: the FIFO is never opened
    (folder / "zz.jpg").unlink()
    Image.new("RGB", (1, 2000)).save(folder / "thin.png")
    with pytest.raises(DataError, match=r"thin.png: 1×2000 pixels, an aspect ratio"):
        files.load_rgb(folder / "thin.png")
    (folder / "thin.png").unlink()
    (folder / "a.txt").write_bytes(b"a photo of \xff\xfe sks")
    with pytest.raises(DataError, match="a.txt: not UTF-8"):
        data_rows.instance_rows(data.DataConfig(instance_dir=str(folder), instance_prompt="a photo of sks dog",
                                           resolution=32), quiet)


# ------------------------------------------------------------------ 11. messages, not tracebacks


def test_a_null_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, photos):
    run(tiny_config(tmp_path, photos, max_steps=2, **{"save.checkpoint_every": 1, "save.keep": 3}), quiet)
    (tmp_path / "out/checkpoints/step-00000002/state.json").write_text("null")
    messages = []
    assert checkpoint.find(tmp_path / "out", "latest", messages.append).name == "step-00000001"
    assert any("damaged" in m for m in messages)


def test_an_unexpected_exception_is_an_internal_error_with_its_traceback_saved(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_BOOTH_CACHE", str(tmp_path))

    def bug(*args, **kwargs):
        raise RuntimeError("a bug of ours")
    monkeypatch.setattr(cli, "_run_file_verb", bug)
    assert cli.main(["inspect", "file=x.safetensors"]) == 70
    message = capsys.readouterr().err
    assert "internal error" in message and "Traceback" not in message
    saved = list((tmp_path / "crashes").glob("*-inspect.txt"))
    assert saved and "RuntimeError: a bug of ours" in saved[0].read_text()


# ------------------------------------------------------------------ 13. files follow the umask


def test_written_files_and_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
        atomic.save_safetensors(tmp_path / "b.safetensors", {"w": torch.zeros(2)})
        staging = atomic.temporary_dir(tmp_path / "folder")
        atomic.publish_folder(staging, tmp_path / "folder")
        os.umask(0o077)
        atomic.write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    assert load_file(str(tmp_path / "b.safetensors"))["w"].shape == (2,)


# ------------------------------------------------------------------ 6. values that make no sense


BASE_KEYS = {"model": "tiny", "instance_dir": "photos", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
             "output_dir": "out"}


@pytest.mark.parametrize("key, value", [
    ("lora.alpha", "0"), ("lora.alpha", "nan"), ("optim.text_encoder_lr", "-1e-4"), ("optim.beta1", "1"),
    ("optim.beta2", "-0.1"), ("optim.eps", "0"), ("lora.text_encoder_rank", "0"), ("data.bucket_max_ratio", "inf"),
    ("data.bucket_max_ratio", "nan"), ("data.bucket_max_ratio", "1e20"), ("optim.max_grad_norm", "nan"),
    ("prior.weight", "nan"), ("optim.lr", "inf"), ("data.caption_ext", ".png"), ("data.caption_ext", "txt"),
    ("prior.guidance_scale", "-1")])
def test_nonsense_values_are_refused_before_any_model_loads(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        loading.resolve({**BASE_KEYS, key: value})


def test_a_preset_given_twice_is_refused():
    with pytest.raises(ConfigError, match="given 2 times"):
        loading.resolve([("preset", "24gb"), ("preset", "8gb"), *BASE_KEYS.items()])


@pytest.mark.parametrize("arguments, key", [
    (["generate", "model=tiny", "prompt=a", "out=x", "n=0"], "'n'"),
    (["generate", "model=tiny", "prompt=a", "out=x", "guidance=nan"], "'guidance'"),
    (["resize", "in=a.safetensors", "out=b.safetensors", "sv_fro=1.5"], "'sv_fro'"),
    (["merge", "lora=a.safetensors:inf", "out=b.safetensors"], "finite")])
def test_every_verb_refuses_nonsense_numbers(arguments, key, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(arguments) in (1, 2)
    assert key in capsys.readouterr().err


# ------------------------------------------------------------------ 8. config files


def test_config_files_that_are_not_files_or_are_bombs_are_refused_at_once(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        loading.resolve({**BASE_KEYS, "config": "/dev/zero"})
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]"
                                                      for i in range(8)] + ["lora: *i"]
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb))
    with pytest.raises(ConfigError, match="aliases") as refused:
        loading.resolve({**BASE_KEYS, "config": str(tmp_path / "bomb.yaml")})
    assert len(str(refused.value)) < 500
    (tmp_path / "huge.yaml").write_text("# " + "x" * (2 * 2**20))
    with pytest.raises(ConfigError, match="at most"):
        loading.resolve({**BASE_KEYS, "config": str(tmp_path / "huge.yaml")})
    (tmp_path / "few.yaml").write_text("lora: &shared {rank: 4}\n")   # an anchor or two is fine
    assert loading.resolve({**BASE_KEYS, "config": str(tmp_path / "few.yaml")})[0].lora.rank == 4
    (tmp_path / "long.yaml").write_text("lora:\n  rank: " + "9" * 5000 + "x\n")
    with pytest.raises(ConfigError) as long_value:
        loading.resolve({**BASE_KEYS, "config": str(tmp_path / "long.yaml")})
    assert len(str(long_value.value)) < 500                       # messages never print unbounded values


# ------------------------------------------------------------------ 7. adapter files are untrusted


MODULE = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def adapter_file(tmp_path, name="a.safetensors", down=None, up=None, extra=None, metadata=None):
    from safetensors.torch import save_file

    tensors = {f"{MODULE}.lora_A.weight": torch.ones(2, 8) if down is None else down,
               f"{MODULE}.lora_B.weight": torch.ones(8, 2) if up is None else up, **(extra or {})}
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case, problem", [
    ("nan", "NaN or infinite"), ("ranks", "rank of down"), ("rank0", "rank of down"), ("dims", "not matrices"),
    ("alpha-shape", "alpha has shape"), ("alpha-nan", "finite"), ("metadata-list", "must be a mapping"),
    ("alpha-text", "not a number"), ("pattern-list", "must be a mapping")])
def test_damaged_or_hostile_adapter_files_are_refused_naming_file_and_module(tmp_path, case, problem):
    from lora_booth.adapters import formats

    kwargs = {
        "nan": dict(down=torch.full((2, 8), float("nan"))),
        "ranks": dict(up=torch.ones(8, 3)),
        "rank0": dict(down=torch.ones(0, 8), up=torch.ones(8, 0)),
        "dims": dict(down=torch.ones(2, 8, 1)),
        "alpha-shape": dict(extra={f"{MODULE}.alpha": torch.ones(3)}),
        "alpha-nan": dict(extra={f"{MODULE}.alpha": torch.tensor(float("nan"))}),
        "metadata-list": dict(metadata={"lora_adapter_metadata": "[1, 2]"}),
        "alpha-text": dict(metadata={"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": "eight"})}),
        "pattern-list": dict(metadata={"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.alpha_pattern": [1]})}),
    }[case]
    path = adapter_file(tmp_path, **kwargs)
    with pytest.raises(formats.AdapterError, match=problem) as refused:
        formats.read(path)
    assert str(path) in str(refused.value)


def test_an_alpha_pattern_from_a_file_is_never_compiled_as_a_regular_expression(tmp_path):
    """`([\\w.]+)+!` backtracks catastrophically against a long module name; matched literally it
    simply names no module."""
    from lora_booth.adapters import formats

    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 4,
                                                     "unet.alpha_pattern": {r"([\w.]+)+!": 1, "attn1.to_q": 8}})}
    adapter = formats.read(adapter_file(tmp_path, metadata=metadata))
    (module,) = adapter.modules.values()
    assert module.alpha == 8                              # the literal suffix pattern applies


# ------------------------------------------------------------------ 14. several machines


def test_a_process_launched_for_several_machines_never_trains_alone(tmp_path, photos, monkeypatch):
    """accelerate's --cpu launcher on two machines starts each as a lone process with MASTER_ADDR
    set and no WORLD_SIZE: refused at start, with the commands that work."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="started this process alone.*torchrun --nnodes"):
        run(tiny_config(tmp_path, photos), quiet)
    assert not (tmp_path / "out").exists()


def test_a_model_folder_with_a_json_list_config_is_a_message(tmp_path, tiny_dir):
    import shutil

    from lora_booth.model import loading as models
    from lora_booth.config.sections import ModelConfig
    from lora_booth.io.errors import ModelError

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    (folder / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="model_index.json: holds a JSON list"):
        models.locate(ModelConfig(source=str(folder)))


def test_generate_refuses_a_size_the_model_cannot_draw(tmp_path):
    from lora_booth.results import sample

    with pytest.raises(ConfigError, match="'size'.*multiples of"):
        sample.generate("tiny", [], "a dog", tmp_path / "images", n=1, steps=1, size=33, report=quiet)


# ------------------------------------------------------------------ 10. long phases show progress


def test_checking_many_photos_shows_a_progress_bar(tmp_path, capsys):
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(50):
        make_photo(folder / f"{index:03d}.png", index, size=(16, 16))
    rows = data_rows.instance_rows(data.DataConfig(instance_dir=str(folder), instance_prompt="a photo of sks dog",
                                              resolution=16), quiet)
    assert len(rows) == 50
    shown = capsys.readouterr().err
    assert "photos:" in shown and "/50" in shown, shown          # a count out of the total, with its rate


# ------------------------------------------------------------------ 12. every verb sweeps its own leftovers


def test_a_verb_sweeps_what_a_killed_run_of_it_left_beside_its_output(tmp_path, capsys):
    leftover = tmp_path / f"{atomic.TEMP_PREFIX}{dead_pid()}-merged-x1"
    leftover.mkdir()
    (leftover / "unet.safetensors").write_bytes(b"1.2 GB, once")
    mine = tmp_path / ".my-own.tmp"
    mine.write_text("the user's")
    assert cli.main(["convert", f"in={tmp_path / 'missing.safetensors'}", "to=kohya",
                     f"out={tmp_path / 'out.safetensors'}"]) == 1                     # fails, after sweeping
    assert not leftover.exists() and mine.exists()
