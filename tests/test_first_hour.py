"""A practitioner's first hour (issue #15): a run names its base, presets hold no subject, the
trigger advice never contradicts itself, and resume never throws work away."""
import json
import shutil

import pytest
import torch

from lora_booth import families
from lora_booth.planning import preset_table
from lora_booth.config import loading
from lora_booth.data import trigger
from lora_booth.io.errors import ConfigError
from lora_booth.training.recipe import run

from conftest import tiny_config
from lora_booth.data import rows as data_rows
from lora_booth.adapters import neutral

SUBJECT = {"instance_dir": "photos", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
           "output_dir": "out"}


def quiet(*_):
    pass


def steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_without_model_is_an_error_that_shows_the_choices():
    with pytest.raises(ConfigError, match="model.source.*hub id.*folder.*single file.*toyworld"):
        loading.resolve(SUBJECT)


def test_the_demo_preset_keeps_its_subject_only_without_photos_of_yours():
    demo, _ = loading.resolve({"preset": "demo", "output_dir": "out"})
    assert demo.model.source == "toyworld" and "star" in demo.data.instance_prompt
    with pytest.raises(ConfigError, match="model.source"):           # your photos: name your base
        loading.resolve({"preset": "demo", **SUBJECT})
    own, sources = loading.resolve({"preset": "demo", "model": "tiny", **SUBJECT})
    assert own.data.instance_prompt == "a photo of sks dog" and own.prior.class_prompt == "a photo of dog"
    assert own.sample.prompts == () and "star" not in json.dumps(own.to_dict())
    assert own.train.device == "cpu"                                  # the preset's other settings stay
    assert loading.resolve({"preset": "tiny", "output_dir": "out"})[0].model.source == "toyworld"  # the old name


def test_the_trigger_advice_only_names_words_that_are_one_token(tiny_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    advice = trigger.advice(tokenizer, "sks")
    for word in trigger.RARE_TOKENS:
        if repr(word) in advice:
            assert len(tokenizer.tokenize(word)) == 1, advice
    if len(tokenizer.tokenize("sks")) > 1:
        assert "'sks'" not in advice


def test_the_tiny_model_is_called_what_it_is(tmp_path, photos):
    messages = []
    run(tiny_config(tmp_path, photos, max_steps=1), messages.append)
    assert any("random weights, for tests" in m for m in messages)


def test_resume_continues_a_finished_run_from_its_last_step_and_from_its_own_folder(tmp_path, photos):
    out = tmp_path / "out"
    run(tiny_config(tmp_path, photos, max_steps=2, **{"save.checkpoint_every": 100}), quiet)
    messages = []
    run(tiny_config(tmp_path, photos, max_steps=3, resume="latest"), messages.append)
    assert any("at step 2" in m for m in messages) and steps(out) == [1, 2, 3]   # no step trained twice
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)                       # a copied run folder resumes where it is
    cfg, _ = loading.resolve({"resume": str(moved), "max_steps": "4"})
    assert cfg.save.output_dir == str(moved) and cfg.train.resume == "latest"
    messages = []
    resumed = run(cfg, messages.append)
    assert resumed.step == 4 and steps(moved) == [1, 2, 3, 4] and steps(out) == [1, 2, 3]


@pytest.mark.parametrize("verb", ["merge", "convert", "resize", "extract", "inspect", "eval", "report", "generate",
                                  "plan", "presets"])
def test_every_verb_has_help(verb, capsys):
    from lora_booth import cli

    assert cli.main([verb, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: lora-booth {verb}")
    if verb in cli.VERB_KEYS:
        assert all(f"  {key}=" in text for key in cli.VERB_KEYS[verb])


def test_a_misspelt_verb_gets_a_suggestion(capsys):
    from lora_booth import cli

    assert cli.main(["mrege"]) == 2
    assert "Did you mean `lora-booth merge`?" in capsys.readouterr().err


def test_double_dash_keys_mean_the_same_key_either_way():
    from lora_booth import cli

    assert cli.parse_pairs(["--rank", "4", "--lr=1e-4", "max_steps=3"]) == [("rank", "4"), ("lr", "1e-4"),
                                                                              ("max_steps", "3")]
    with pytest.raises(ConfigError, match="key=value"):
        cli.parse_pairs(["rank", "4"])


# ---- every checkpoint is a LoRA, and every verb takes one


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A 4-step tiny run with a checkpoint at steps 2 and 4, and a folder of the user's own that
    happens to be named like a checkpoint."""
    from conftest import make_photos

    root = tmp_path_factory.mktemp("checkpointed")
    mine = root / "out" / "checkpoints" / "step-99999999"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    run(tiny_config(root, make_photos(root), max_steps=4, **{"save.checkpoint_every": 2, "save.keep": 2}), quiet)
    return root / "out"


def test_each_checkpoint_holds_the_adapter_of_its_step_in_both_formats(checkpointed_run):
    from lora_booth.adapters import formats

    out = checkpointed_run
    for step in (2, 4):
        folder = out / "checkpoints" / f"step-{step:08d}"
        assert (folder / neutral.DIFFUSERS_WEIGHT_NAME).is_file() and (folder / f"sks_dog-{step:06d}.safetensors").is_file()
    last = formats.read(out / "checkpoints" / "step-00000004")
    final = formats.read(out)
    assert set(last.modules) == set(final.modules)
    for key, module in final.modules.items():
        assert torch.equal(module.delta(), last.modules[key].delta())
    first = formats.read(out / "checkpoints" / "step-2")         # the short name users type
    assert any(not torch.equal(m.delta(), last.modules[k].delta()) for k, m in first.modules.items())
    assert (out / "checkpoints" / "step-99999999" / "notes.txt").read_text() == "mine"  # not pruned as a checkpoint
    assert (out / "sks_dog.safetensors").is_file()               # named after the subject, not after out/


def test_checkpoint_folders_load_in_diffusers_and_in_every_verb(checkpointed_run, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from lora_booth import cli
    from lora_booth.adapters import formats
    from lora_booth.families.tiny import tiny_model_dir

    folder = checkpointed_run / "checkpoints" / "step-00000002"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir(), safety_checker=None)
    pipe.load_lora_weights(str(folder))                           # diffusers itself, on the checkpoint folder
    assert cli.main(["inspect", str(checkpointed_run / "checkpoints" / "step-2")]) == 0
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().out
    assert cli.main(["convert", f"in={folder}", "to=kohya", f"out={tmp_path / 'converted'}/"]) == 0
    assert (tmp_path / "converted" / "sks_dog-000002.safetensors").is_file()  # its step, as the checkpoint names it
    # generate without model=: the base and the size the adapter was trained with
    assert cli.main(["generate", f"lora={folder}", "prompt=a photo of sks dog", f"out={tmp_path / 'images'}",
                     "n=1", "steps=2"]) == 0
    assert "model=tiny" in capsys.readouterr().out
    with Image.open(tmp_path / "images" / "0000.png") as image:
        assert image.size == (32, 32)
    with pytest.raises(formats.AdapterError, match="training state.*pytorch_lora_weights.safetensors"):
        formats.read(folder / "adapter.safetensors")
    assert cli.main(["merge", "base=tiny", f"lora={folder}", f"out={tmp_path / 'merged'}"]) == 0
    assert (tmp_path / "merged" / "unet").is_dir()


def test_the_model_cards_diffusers_snippet_runs_as_written(checkpointed_run):
    import re
    import subprocess
    import sys

    card = (checkpointed_run / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "from_pretrained(tiny_model_dir('tiny'))" in code
    code = code.replace("image = pipe(", "pipe.set_progress_bar_config(disable=True)\nimage = pipe(", 1)
    code = code.replace(").images[0]", ", num_inference_steps=2).images[0]")  # as written, but two sampler steps
    done = subprocess.run([sys.executable, "-c", code + "\nprint(image.size)"], cwd=checkpointed_run.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(32, 32)" in done.stdout or "(64, 64)" in done.stdout


# ---- conventions users bring from other trainers


def test_list_values_take_the_list_syntax_users_try(tmp_path, photos):
    cfg = tiny_config(tmp_path, photos, **{"sample.prompts": '["a photo of sks dog, smiling", "a photo of dog"]'})
    assert cfg.sample.prompts == ("a photo of sks dog, smiling", "a photo of dog")
    assert tiny_config(tmp_path, photos, **{"sample.prompts": "[a, b]"}).sample.prompts == ("a", "b")
    assert tiny_config(tmp_path, photos, **{"sample.prompts": "a,b"}).sample.prompts == ("a", "b")
    with pytest.raises(ConfigError, match="sample.prompts.*not a list"):
        tiny_config(tmp_path, photos, **{"sample.prompts": "[a, b"})


def kohya_folder(root):
    from conftest import make_photo

    folder = root / "img" / "3_sks dog"
    folder.mkdir(parents=True)
    for index in range(2):
        make_photo(folder / f"{index}.png", index)
    (folder / "1.caption").write_text("sks dog on a red sofa")
    return root / "img"


def test_kohya_repeat_folders_and_caption_files_read_as_kohya_reads_them(tmp_path):
    images = kohya_folder(tmp_path)
    cfg, sources = loading.resolve({"model": "tiny", "instance_dir": str(images), "class_prompt": "a photo of dog",
                                   "output_dir": str(tmp_path / "out"), "data.repeats": "2"})
    assert cfg.data.instance_prompt == "sks dog" and "folder name" in sources["data.instance_prompt"]
    rows = data_rows.instance_rows(cfg.data, quiet)
    assert len(rows) == 2 * 3 * 2                                # 2 photos × 3 (folder) × 2 (data.repeats)
    assert sorted({(r.path.name, r.prompt) for r in rows}) == [("0.png", "sks dog"), ("1.png", "sks dog on a red sofa")]
    assert [r.path.name for r in rows[:4]] == ["0.png", "1.png", "0.png", "1.png"]  # whole passes


def test_a_kohya_dataset_toml_becomes_the_same_keys_or_is_refused_by_key(tmp_path):
    images = kohya_folder(tmp_path)
    (tmp_path / "reg").mkdir()
    toml = tmp_path / "dataset.toml"
    body = f'''[general]
caption_extension = ".caption"
shuffle_caption = false
[[datasets]]
resolution = [64, 64]
batch_size = 2
enable_bucket = true
  [[datasets.subsets]]
  image_dir = "{images.as_posix()}"
  class_tokens = "sks dog"
  num_repeats = 4
  flip_aug = true
  [[datasets.subsets]]
  is_reg = true
  image_dir = "{(tmp_path / 'reg').as_posix()}"
  class_tokens = "dog"
'''
    toml.write_text(body)
    cfg, sources = loading.resolve({"model": "tiny", "dataset": str(toml), "output_dir": str(tmp_path / "out")})
    assert (cfg.data.instance_dir, cfg.data.instance_prompt, cfg.data.repeats) == (images.as_posix(), "sks dog", 4)
    assert (cfg.data.caption_ext, cfg.data.resolution, cfg.train.batch_size, cfg.data.buckets, cfg.data.flip) == \
        (".caption", 64, 2, True, True)
    assert (cfg.prior.class_dir, cfg.prior.class_prompt) == ((tmp_path / "reg").as_posix(), "dog")
    assert sources["data.repeats"] == str(toml)
    for bad, named in [("shuffle_caption = false", "shuffle_caption = true"),
                       ("flip_aug = true", "flip_aug = true\n  face_crop_aug_range = [2.0, 4.0]"),
                       ('class_tokens = "dog"', 'class_tokens = "dog"\n  num_repeats = 3')]:
        toml.write_text(body.replace(bad, named))
        key = named.split("\n")[-1].split("=")[0].strip()
        with pytest.raises(ConfigError, match=f"{toml}: {key}"):
            loading.resolve({"model": "tiny", "dataset": str(toml), "output_dir": str(tmp_path / "out")})
    toml.write_text(body.replace('class_tokens = "dog"', 'class_tokens = "dog"\n  flip_aug = false'))
    with pytest.raises(ConfigError, match="flip_aug.*one setting to both"):   # class rows flip as the photos do
        loading.resolve({"model": "tiny", "dataset": str(toml), "output_dir": str(tmp_path / "out")})
    toml.write_text(body.replace("num_repeats = 4", "num_repeats = 4.5"))
    with pytest.raises(ConfigError, match="num_repeats.*whole number"):
        loading.resolve({"model": "tiny", "dataset": str(toml), "output_dir": str(tmp_path / "out")})
    toml.write_text(body + body[body.index("[[datasets]]"):])
    with pytest.raises(ConfigError, match="2 datasets"):
        loading.resolve({"model": "tiny", "dataset": str(toml), "output_dir": str(tmp_path / "out")})


def test_presets_are_listed_by_card_size_with_whole_sentences(capsys):
    text = preset_table.presets_text()
    text = text[text.index("\ndemo: ") + 1:]                  # the files, after the overview table
    names = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith((" ", "Each"))]
    assert names[:12] == ["demo", "6gb", "8gb", "12gb", "16gb", "24gb", "sdxl-8gb", "sdxl-12gb", "sdxl-16gb",
                          "sdxl-24gb", "flux-16gb", "flux-24gb"]
    assert sorted(names) == sorted(loading.preset_names())
    # the later families' presets (Z-Image, Qwen-Image ...): each family together, smallest card first
    prefixes = [families.for_preset(name).preset_prefix for name in names[12:]]
    assert [p for i, p in enumerate(prefixes) if i == 0 or p != prefixes[i - 1]] == list(dict.fromkeys(prefixes))
    for prefix in set(prefixes):
        sizes = [int(n.removeprefix(prefix).removesuffix("gb")) for n in names[12:] if n.startswith(prefix)
                 and families.for_preset(n).preset_prefix == prefix]
        assert sizes == sorted(sizes), prefix
    for line in text.splitlines():
        if line and not line.startswith((" ", "Each")):
            assert line.rstrip().endswith("."), line


def test_an_unreachable_hub_goes_to_the_cache_at_once(monkeypatch):
    import huggingface_hub

    from lora_booth.model import loading as models
    from lora_booth.config.sections import ModelConfig
    from lora_booth.io.errors import ModelError

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")      # nothing listens on the discard port
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    models.hub_unreachable.cache_clear()
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        raise OSError("not in the cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    try:
        with pytest.raises(ModelError, match="org/model.*not in the local hub cache"):
            models.hub_snapshot("org/model", ModelConfig(source="org/model"))
        assert calls and all(call.get("local_files_only") for call in calls)
    finally:
        models.hub_unreachable.cache_clear()


def test_presets_live_at_the_top_of_the_repository_and_install_with_the_package():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # that a wheel holds them as lora_booth/presets: tests/test_wheel.py builds and installs it
    assert loading.presets_dir() == root / "presets" and not (root / "lora_booth" / "presets").exists()
    assert {p.stem for p in (root / "presets").glob("*.yaml")} == set(loading.preset_names()) >= {"demo", "8gb"}
