"""Never lose work, second round (issue #29): lora-booth removes only what it wrote, also through
symlinks and under its fixed names (class 1); one run per real folder (class 2); a damaged
checkpoint folder never blocks saving that step again (class 6); the end of a run survives a full
disk without earlier checkpoints, and the message says what survived (class 7)."""
import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lora_booth import atomic, checkpoint, locking, manifest, preparation
from lora_booth.errors import ConfigError, WriteError
from lora_booth.recipe import TrainingError, run

from conftest import tiny_config


def quiet(*_):
    pass


def users_file(path, text="the user's own"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------- 1. fixed names: only files lora-booth wrote


@pytest.mark.parametrize("name", [*preparation.RUN_FILES, "pytorch_lora_weights.safetensors",
                                  "sks_dog.safetensors"])
@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_a_fresh_run_never_replaces_a_users_file_that_has_one_of_its_names(tmp_path, photos, name, overwrite):
    out = tmp_path / "out"
    mine = users_file(out / name) if name != "samples" else users_file(out / "samples" / "step-00000001.png")
    with pytest.raises(ConfigError, match=rf"{name}.*lora-booth did not write"):
        run(tiny_config(tmp_path, photos, overwrite=overwrite), quiet)
    assert mine.read_text() == "the user's own"
    assert not (out / "config.yaml").exists() or name == "config.yaml"


def test_any_write_inside_a_run_folder_refuses_a_file_the_run_did_not_write(tmp_path):
    """The rule holds at the writer itself, for names a run writes later (samples, eval.json, ...)."""
    out = tmp_path / "out"
    out.mkdir()
    mine = users_file(out / "samples" / "step-00000004.png")
    manifest.activate(out)
    try:
        atomic.write_text(out / "config.yaml", "ours")
        atomic.write_text(out / "config.yaml", "ours again")       # its own file: replaced
        with pytest.raises(WriteError, match="lora-booth did not write it"):
            atomic.write_text(mine, "replaced")
    finally:
        manifest.deactivate(out)
    assert mine.read_text() == "the user's own" and (out / "config.yaml").read_text() == "ours again"


def test_report_never_replaces_a_report_html_lora_booth_did_not_write(tmp_path, photos):
    import shutil

    from lora_booth import cli

    run(tiny_config(tmp_path, photos, max_steps=1), quiet)
    copied = tmp_path / "downloaded-run"   # a run folder from elsewhere: no record of lora-booth's
    shutil.copytree(tmp_path / "out", copied, ignore=shutil.ignore_patterns(manifest.NAME, "report.html"))
    mine = users_file(copied / "report.html")
    assert cli.main(["report", str(copied)]) != 0
    assert mine.read_text() == "the user's own"
    mine.unlink()
    assert cli.main(["report", str(copied)]) == 0 and cli.main(["report", str(copied)]) == 0  # its own: replaced
    assert cli.main(["report", str(tmp_path / "out")]) == 0    # listed in the run's record: replaced


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.yaml", manifest.NAME, "run.json", "README.md", "samples",
                                  "checkpoints", "sks_dog.safetensors"])
@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_symlinks_planted_under_fixed_names_are_never_followed(tmp_path, photos, name, overwrite):
    target = users_file(tmp_path / "elsewhere" / name)
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(target.parent if name in ("samples", "checkpoints") else target)
    with pytest.raises(ConfigError, match=name):
        run(tiny_config(tmp_path, photos, overwrite=overwrite), quiet)
    assert target.read_text() == "the user's own" and (out / name).is_symlink()   # not even the link was removed


def test_the_lock_file_is_never_opened_through_a_symlink(tmp_path):
    target = users_file(tmp_path / "precious.txt")
    output = tmp_path / "model.safetensors"
    locking.lock_path_for(output).symlink_to(target)
    with pytest.raises(locking.LockedError, match="not lora-booth's"):
        with locking.exclusive(output, "merge"):
            pass
    assert target.read_text() == "the user's own"


def test_manifest_entries_are_resolved_before_anything_is_deleted(tmp_path, photos):
    """overwrite=true on a run folder from elsewhere: its record can name paths that lead out of
    it through symlinked folders; those files stay."""
    outside = tmp_path / "elsewhere"
    precious = users_file(outside / "precious.txt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(outside)
    (out / manifest.NAME).write_text("link/precious.txt\nlink\nlink/../elsewhere/precious.txt\n")
    manifest.Manifest(out).remove_recorded()
    assert precious.read_text() == "the user's own" and outside.is_dir()
    assert not (out / "link").exists()   # the link itself was the record's: gone, not what it points to


def test_checkpoint_folders_reached_through_symlinks_are_never_emptied(tmp_path, photos):
    elsewhere = tmp_path / "elsewhere"
    precious = users_file(elsewhere / "adapter.safetensors")
    (elsewhere / "state.json").write_text(json.dumps({"sha256": {"adapter.safetensors": "x"}}))
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-00000001").symlink_to(elsewhere)
    run(tiny_config(tmp_path, photos, max_steps=1, overwrite="true"), quiet)
    assert precious.read_text() == "the user's own" and (elsewhere / "state.json").is_file()


@pytest.mark.parametrize("where", ["inside the photos", "inside the class images", "above the class images"])
def test_an_output_folder_inside_or_around_any_input_folder_is_refused(tmp_path, photos, where):
    classes = tmp_path / "class" / "dogs"
    classes.mkdir(parents=True)
    out = {"inside the photos": photos / "1_run", "inside the class images": classes / "out",
           "above the class images": tmp_path / "class"}[where]
    before = sorted(p.name for p in photos.iterdir())
    with pytest.raises(ConfigError, match="save.output_dir"):
        run(tiny_config(tmp_path, photos, output_dir=out, **{"prior.class_dir": classes}), quiet)
    assert sorted(p.name for p in photos.iterdir()) == before and not list(classes.iterdir())


# ------------------------------------------------------- 2. one run per real folder


@pytest.mark.parametrize("spelling", ["a symlink to it", "a symlinked parent", "a path through .."])
def test_the_same_folder_by_another_path_is_busy(tmp_path, photos, spelling):
    real = tmp_path / "runs" / "out"
    real.mkdir(parents=True)
    (tmp_path / "other").mkdir()
    if spelling == "a symlink to it":
        (tmp_path / "alias").symlink_to(real)
        other = tmp_path / "alias"
    elif spelling == "a symlinked parent":
        (tmp_path / "runs-link").symlink_to(tmp_path / "runs")
        other = tmp_path / "runs-link" / "out"
    else:
        other = tmp_path / "other" / ".." / "runs" / "out"
    with locking.exclusive(real, "train"):
        with pytest.raises(locking.LockedError, match="another lora-booth process"):
            run(tiny_config(tmp_path, photos, output_dir=other), quiet)
        with pytest.raises(locking.LockedError):
            with locking.exclusive(other, "merge"):
                pass


def test_a_folder_is_busy_by_its_inode_whatever_the_lock_file_beside_it(tmp_path, monkeypatch):
    """Another mount path of the same folder has another lock file beside it (simulated: the lock
    file's name is made to differ); the folder's own lock still refuses the second writer."""
    out = tmp_path / "out"
    out.mkdir()
    with locking.exclusive(out, "train"):
        monkeypatch.setattr(locking, "LOCK_NAME", ".elsewhere.lock")
        with pytest.raises(locking.LockedError, match="another lora-booth process"):
            with locking.exclusive(out, "train"):
                pass


# ------------------------------------------------------- 6. a damaged checkpoint folder never blocks


def damage(folder, how):
    if how == "state.json cut short":
        text = (folder / "state.json").read_text()
        (folder / "state.json").write_text(text[: len(text) // 2])
    elif how == "state.json gone":
        (folder / "state.json").unlink()
    elif how == "a damaged adapter file":
        (folder / "adapter.safetensors").write_bytes(b"not a tensor file")
    elif how == "a symlink in its place":
        target = users_file(folder.parent.parent.parent / "precious.txt")
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
        folder.symlink_to(target)


@pytest.mark.parametrize("how", ["state.json cut short", "state.json gone", "a damaged adapter file",
                                 "a symlink in its place"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_that_step_saved_again(tmp_path, photos, how):
    keys = {"save.checkpoint_every": 1, "save.keep": 3}
    run(tiny_config(tmp_path, photos, max_steps=2, **keys), quiet)
    folder = tmp_path / "out/checkpoints/step-00000002"
    damage(folder, how)
    (tmp_path / "out/pytorch_lora_weights.safetensors").unlink()   # as if killed before the end
    messages = []
    run(tiny_config(tmp_path, photos, max_steps=2, resume="latest", **keys), messages.append)
    assert checkpoint.verify(folder)["step"] == 2
    aside = tmp_path / "out/checkpoints/damaged-step-00000002"
    if how != "a damaged adapter file":  # its state.json still lists its files: removed as lora-booth's own
        assert any(str(aside) in m and "moved it aside" in m for m in messages), messages
        assert aside.exists() or aside.is_symlink()
    if how == "a symlink in its place":
        assert (tmp_path / "precious.txt").read_text() == "the user's own"


# ------------------------------------------------------- 7. the end of a run survives a full disk


def full_disk(monkeypatch, where):
    """ENOSPC for every tensor file written under `where` (a list of folders)."""
    original = atomic.save_safetensors

    def writer(final, tensors, metadata=None):
        real = os.path.realpath(final)
        if any(real.startswith(os.path.realpath(folder)) for folder in where):
            raise atomic.write_error(final, OSError(errno.ENOSPC, "No space left on device"), 2**20)
        return original(final, tensors, metadata)
    monkeypatch.setattr(atomic, "save_safetensors", writer)


def test_a_full_disk_at_the_end_without_checkpoints_keeps_the_state_elsewhere(tmp_path, photos, monkeypatch):
    monkeypatch.setenv("LORA_BOOTH_CACHE", str(tmp_path / "cache"))
    keys = {"save.checkpoint_every": 0, "max_steps": 3}
    straight = run(tiny_config(tmp_path / "straight", photos, **keys), quiet)
    full_disk(monkeypatch, [tmp_path / "out"])
    with pytest.raises(TrainingError) as failure:
        run(tiny_config(tmp_path, photos, **keys), quiet)
    message = str(failure.value)
    assert "intact" not in message and "saved to" in message, message
    rescued = next((tmp_path / "cache").rglob("step-00000003"))
    assert str(rescued) in message and checkpoint.verify(rescued)["step"] == 3
    monkeypatch.undo()
    monkeypatch.setenv("LORA_BOOTH_CACHE", str(tmp_path / "cache"))
    messages = []
    finished = run(tiny_config(tmp_path, photos, resume=str(rescued), **keys), messages.append)
    assert not any(m.startswith("trained ") for m in messages)          # no step trained again
    expected, got = load_file(str(straight.adapter)), load_file(str(finished.adapter))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert checkpoint.verify(tmp_path / "out/checkpoints/step-00000003")["step"] == 3   # back in the run folder


@pytest.mark.parametrize("earlier", [False, True])
def test_when_nothing_can_be_saved_the_message_says_exactly_what_survived(tmp_path, photos, monkeypatch, earlier):
    monkeypatch.setenv("LORA_BOOTH_CACHE", str(tmp_path / "cache"))
    if earlier:   # step 2's checkpoint is written; only step 3's meets a full disk
        original = atomic.save_safetensors

        def writer(final, tensors, metadata=None):
            if "step-00000003" in str(final):
                raise atomic.write_error(final, OSError(errno.ENOSPC, "No space left on device"), 2**20)
            return original(final, tensors, metadata)
        monkeypatch.setattr(atomic, "save_safetensors", writer)
    else:
        full_disk(monkeypatch, ["/"])
    keys = {"save.checkpoint_every": 2 if earlier else 0, "max_steps": 3}
    with pytest.raises(TrainingError) as failure:
        run(tiny_config(tmp_path, photos, **keys), quiet)
    message = str(failure.value)
    assert "Nothing of step 3 could be saved" in message and "intact" not in message
    if earlier:
        assert "step-00000002 (step 2)" in message and "resume=latest" in message
    else:
        assert "no earlier checkpoint" in message and "resume=latest" not in message
