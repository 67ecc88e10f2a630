"""Issue #29, classes 3, 4, 5, 8, 9, 10, 11 and 13: files read back, numbers, alpha, intentions,
internal errors, names that are not UTF-8, generated documents and messages. Each test runs a
class's examples through the verbs a user runs and asserts a message that names the culprit; none
may end in the "internal error" handler (rc 70), hang on a pipe, or exit 0 having done the wrong thing."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_booth.model import checkpoint
from lora_booth import cli
from lora_booth.config import loading
from lora_booth.adapters import formats
from lora_booth.adapters import neutral
from lora_booth.adapters import diffusers_layout
from lora_booth.io.errors import CheckpointError, ConfigError
from lora_booth.training.recipe import run

from conftest import make_photo, make_photos, tiny_config


FIFOS: list[Path] = []   # the pipes a test planted; a reader blocked on one is released after a while


# run in a separate process: a reader blocked opening a pipe inside native code may hold the GIL
RELEASER = """
import os, sys, time
seconds, marker, fifos = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
while True:
    time.sleep(seconds)
    for fifo in fifos:
        try:
            descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody is reading it, which is how it should be
            continue
        open(marker, "a").write(fifo + "\\n")
        os.close(descriptor)
"""


@contextlib.contextmanager
def no_pipe_waited_on(arguments: str, seconds: int = 20):
    """Fails the test when the code inside opened a planted pipe and waited on it: every `seconds`
    another process opens each pipe for writing, which releases a blocked reader (it then reads an
    empty file and goes on), and notes that it did."""
    import subprocess
    import sys
    import tempfile

    marker = Path(tempfile.mkdtemp()) / "waited"
    releaser = subprocess.Popen([sys.executable, "-c", RELEASER, str(seconds), str(marker), *map(str, FIFOS)])
    try:
        yield
    finally:
        releaser.kill()
        releaser.wait()
    assert not marker.exists(), f"{arguments} opened a pipe and waited on it: {marker.read_text()}"


def call(arguments: list[str], capsys, seconds: int = 20) -> tuple[int, str]:
    """`lora-booth …` in this process; (exit status, stderr)."""
    with no_pipe_waited_on(f"lora-booth {' '.join(arguments)}", seconds):
        code = cli.main(arguments)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run with checkpoints and a sample grid: the files later verbs read back."""
    root = tmp_path_factory.mktemp("hostile")
    cfg = tiny_config(root, make_photos(root), max_steps=2, **{"sample.num": 1, "sample.every": 2,
                                                               "save.checkpoint_every": 1})
    run(cfg, lambda *_: None)
    return root / "out"


def copy_of(trained: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(trained, folder)
    return folder


def make_fifo(path: Path) -> None:
    os.mkfifo(path)
    FIFOS.append(path)


def replace_with_fifo(path: Path) -> None:
    path.unlink()
    make_fifo(path)


def write(path: Path, content) -> None:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def kohya_file(trained: Path, tmp_path: Path, change) -> Path:
    """The run's kohya file with `change(tensors, metadata)` applied, saved beside the test."""
    source = next(p for p in trained.glob("*.safetensors") if p.name != "pytorch_lora_weights.safetensors")
    tensors = load_file(str(source))
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
    change(tensors, metadata)
    path = tmp_path / "hostile.safetensors"
    save_file(tensors, str(path), metadata)
    return path


# --------------------------------------------------------------- class 3: files read back are untrusted

RUN_FOLDER_CASES = {
    "config.yaml is a pipe": ("config.yaml", lambda p: replace_with_fifo(p)),
    "metrics.jsonl is a pipe": ("metrics.jsonl", lambda p: replace_with_fifo(p)),
    "run.json is a pipe": ("run.json", lambda p: replace_with_fifo(p)),
    "eval.json is a pipe": ("eval.json", lambda p: make_fifo(p)),
    "config.yaml is not UTF-8": ("config.yaml", lambda p: write(p, b"\xff\xfe\x00 garbage")),
    "config.yaml of 30 MB": ("config.yaml", lambda p: write(p, "# " + "x" * (30 * 2**20))),
    "metrics rows of the wrong type": ("metrics.jsonl", lambda p: write(p, '1\n[]\n{"step": "a", "loss": "b"}\n')),
    "metrics step is negative": ("metrics.jsonl", lambda p: write(p, '{"step": -5, "loss": 1.0}\n')),
    "metrics loss is a mapping": ("metrics.jsonl", lambda p: write(p, '{"step": 1, "loss": {"a": 1}}\n')),
    "metrics nested 100,000 deep": ("metrics.jsonl", lambda p: write(p, "[" * 100_000 + "]" * 100_000 + "\n")),
    "metrics with a broken line inside": ("metrics.jsonl", lambda p: write(p, '{"step": 1, "loss": 1.0}\n{"st\n'
                                                                                '{"step": 2, "loss": 1.0}\n')),
    "run.json is a list": ("run.json", lambda p: write(p, "[1, 2]")),
    "run.json seconds is text": ("run.json", lambda p: write(p, '{"steps": 2, "seconds": "y"}')),
    "run.json nested deep": ("run.json", lambda p: write(p, "[" * 100_000 + "]" * 100_000)),
    "eval.json is a list": ("eval.json", lambda p: write(p, "[1, 2]")),
    "eval.json score is text": ("eval.json", lambda p: write(p, '{"scores": {"dino": "high"}}')),
}


@pytest.mark.parametrize("case", RUN_FOLDER_CASES)
def test_report_reads_a_run_folder_as_untrusted_input(trained, tmp_path, capsys, case):
    """A run folder handed to `report` may come from anywhere: each damaged file is refused with
    its name, never opened when it is a pipe, never an internal error."""
    name, damage = RUN_FOLDER_CASES[case]
    folder = copy_of(trained, tmp_path)
    damage(folder / name)
    code, err = call(["report", str(folder)], capsys)
    assert code == 1, err
    assert f"{folder / name}" in err and "internal error" not in err


GRID_CASES = {
    "grid is a pipe": lambda grid: replace_with_fifo(grid),
    "grid's text claims 99999 columns and rows": lambda grid: _retext(grid, {"num": "99999",
                                                                             "prompts": "\n".join("p" * 3 * 10**5)}),
}


def _retext(grid: Path, text: dict) -> None:
    from PIL import Image, PngImagePlugin

    with Image.open(grid) as image:
        image.load()
        info = PngImagePlugin.PngInfo()
        for key, value in {**{k: v for k, v in image.info.items() if isinstance(v, str)}, **text}.items():
            info.add_text(key, value)
        image.save(grid, pnginfo=info)


@pytest.mark.parametrize("case", GRID_CASES)
def test_report_skips_sample_grids_it_cannot_believe(trained, tmp_path, capsys, case):
    folder = copy_of(trained, tmp_path)
    grid = sorted((folder / "samples").glob("step-*.png"))[-1]
    GRID_CASES[case](grid)
    code, err = call(["report", str(folder)], capsys)
    assert code == 0, err
    assert (folder / "report.html").stat().st_size > 0


STATE_CASES = {"negative step": {"step": -1}, "fractional step": {"step": 2.5}, "astronomical step": {"step": 10**30},
               "step is text": {"step": "2"}, "step is a bool": {"step": True}, "rows_done negative": {"rows_done": -4},
               "micro_steps is text": {"micro_steps": "x"}, "data rows are a list": {"data": {"instance": [1, 2]}},
               "optimizer is a list": {"optimizer": [1]}}


@pytest.mark.parametrize("case", STATE_CASES)
def test_resume_reads_state_json_as_untrusted_input(trained, tmp_path, case):
    """state.json sits beside files whose hashes it lists, but nothing vouches for the file itself:
    its counters and records are checked for type and range before a resume trusts them."""
    folder = copy_of(trained, tmp_path)
    newest = checkpoint.folders(folder)[-1]
    state = json.loads((newest / "state.json").read_text())
    (newest / "state.json").write_text(json.dumps({**state, **STATE_CASES[case]}))
    with pytest.raises(CheckpointError, match=str(newest)):
        checkpoint.verify(newest)
    replace_with_fifo(newest / "state.json")  # and a pipe in its place is refused, not waited on
    with no_pipe_waited_on("checkpoint.verify"), pytest.raises(CheckpointError, match="pipe"):
        checkpoint.verify(newest)


def _metadata_config(change):
    def apply(tensors, metadata):
        saved = json.loads(metadata["lora_booth.config"])
        change(saved)
        metadata["lora_booth.config"] = json.dumps(saved)
    return apply


ADAPTER_CASES = {
    "recorded resolution of a billion px": (["generate"], _metadata_config(lambda c: c["data"].update(resolution=10**9))),
    "recorded resolution is text": (["generate"], _metadata_config(lambda c: c["data"].update(resolution="512px"))),
    "recorded model is a list": (["generate"], _metadata_config(lambda c: c.update(model=[1]))),
    "metadata names another family's base": (["generate"], _metadata_config(
        lambda c: c["model"].update(source="tiny-sdxl"))),
    "declared widths of 200,000 for resize": (["resize", "rank=1"], lambda t, m: _widen(t)),
}


def _widen(tensors):
    down = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[down] = torch.full((1, 200_000), 0.01)
    tensors[down.replace("lora_down", "lora_up")] = torch.full((200_000, 1), 0.01)
    tensors[down.replace("lora_down.weight", "alpha")] = torch.tensor(1.0)


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_adapter_files_are_checked_before_use(trained, tmp_path, capsys, case):
    """What an adapter's metadata claims (base model, resolution) and the widths its header
    declares are checked against the tensors and the machine before anything is built or applied."""
    verb, change = ADAPTER_CASES[case]
    path = kohya_file(trained, tmp_path, change)
    out = tmp_path / "result"
    extra = [f"lora={path}", "prompt=a photo", f"out={out}", "n=1", "steps=1"] if verb[0] == "generate" else \
        [f"in={path}", f"out={out}.safetensors", *verb[1:]]
    code, err = call([verb[0], *extra], capsys)
    assert code in (1, 2) and "internal error" not in err, err
    assert "hostile.safetensors" in err
    assert not list(tmp_path.glob("result*"))


@pytest.mark.parametrize("verb", ["inspect", "convert", "generate", "resize"])
def test_a_pipe_named_as_an_adapter_is_refused_unopened(tmp_path, capsys, verb):
    fifo = tmp_path / "adapter.safetensors"
    make_fifo(fifo)
    arguments = {"inspect": [str(fifo)], "convert": [f"in={fifo}", "to=kohya", f"out={tmp_path / 'o.safetensors'}"],
                 "generate": ["model=tiny", f"lora={fifo}", "prompt=x", f"out={tmp_path / 'o'}", "n=1", "steps=1"],
                 "resize": [f"in={fifo}", f"out={tmp_path / 'o.safetensors'}", "rank=1"]}[verb]
    code, err = call([verb, *arguments], capsys)
    assert code == 1 and "pipe (FIFO)" in err and str(fifo) in err  # class 13: not "no such file"


@pytest.mark.parametrize("document", ["a = " + "[" * 5000 + "]" * 5000, "x = " + "{a = " * 3000 + "1" + "}" * 3000])
def test_a_dataset_toml_of_pathological_depth_is_a_message(tmp_path, document):
    path = tmp_path / "deep.toml"
    path.write_text(document)
    with pytest.raises(ConfigError, match="nests deeper"):
        loading.resolve({"dataset": str(path), "output_dir": str(tmp_path / "out")})


# --------------------------------------------------------------- class 4: every number has a ceiling

TRAIN_CEILINGS = {"data.resolution": "8000000", "lora.rank": "100000000", "train.batch_size": "100000000",
                  "validate.rows": "1000000000", "train.seed": str(2**70), "sample.seed": "-1",
                  "prior.num_class_images": str(10**12), "train.max_steps": str(10**20), "sample.num": "100000000",
                  "data.repeats": "100000000", "lora.alpha": "1e12"}


@pytest.mark.parametrize("key", TRAIN_CEILINGS)
def test_every_training_number_has_a_ceiling(tmp_path, photos, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(tmp_path, photos, **{key: TRAIN_CEILINGS[key]})


def test_a_batch_size_from_a_dataset_toml_has_the_same_ceiling(tmp_path, photos):
    toml = tmp_path / "data.toml"
    toml.write_text(f"[general]\nbatch_size = 100000000\n[[datasets]]\nresolution = 512\n"
                    f"[[datasets.subsets]]\nimage_dir = '{photos}'\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size.*data\.toml"):
        loading.resolve({"dataset": str(toml), "instance_prompt": "a photo of sks dog", "class_prompt": "a photo",
                        "output_dir": str(tmp_path / "out")})


VERB_CEILINGS = {"size": ["size=1000000"], "n": ["n=100000000000"], "seed": [f"seed={10**24}"],
                 "negative seed": ["seed=-5"], "steps": ["steps=10000000000"]}


@pytest.mark.parametrize("case", VERB_CEILINGS)
def test_generate_numbers_have_ceilings(tmp_path, capsys, case):
    code, err = call(["generate", "model=tiny", "prompt=x", f"out={tmp_path / 'o'}", *VERB_CEILINGS[case]], capsys)
    assert code == 2 and f"'{case.split()[-1]}'" in err, err


@pytest.mark.parametrize("scale", ["1e30", "-1e6", "101"])
def test_merge_and_combine_scales_have_a_ceiling(trained, tmp_path, capsys, scale):
    adapter = trained / "pytorch_lora_weights.safetensors"
    for arguments in (["base=tiny", f"out={tmp_path / 'merged'}"], [f"out={tmp_path / 'sum.safetensors'}"]):
        code, err = call(["merge", f"lora={adapter}:{scale}", *arguments], capsys)
        assert code == 1 and "beyond" in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_merge_that_overflows_the_target_dtype_writes_nothing(tmp_path, tiny_dir, capsys, dtype):
    """Weights of an adapter that are large but finite, at an allowed scale, sum past fp16's
    65504 (bf16 reaches fp32's 3e38: its case uses halves of 1e19)."""
    big = 3e4 if dtype == "fp16" else 1e19
    adapter = neutral.Adapter({("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"): neutral.Module(
        down=torch.full((1, 64), big), up=torch.full((64, 1), big), alpha=1.0)})
    source = diffusers_layout.write_diffusers(adapter, tmp_path / "big.safetensors")
    code, err = call(["merge", f"base={tiny_dir}", f"lora={source}:100", f"out={tmp_path / 'merged'}",
                      f"dtype={dtype}"], capsys)
    assert code == 1 and "infinite" in err and "attn1.to_q" in err, err
    assert not (tmp_path / "merged").exists()


# --------------------------------------------------------------- class 5: adapter alpha, completely

def _alphas(value):
    def apply(tensors, metadata):
        for key in tensors:
            if key.endswith(".alpha"):
                tensors[key] = torch.tensor(float(value))
    return apply


@pytest.mark.parametrize("alpha", [0.0, -2.0, 1e6, 1e-9])
def test_adapter_alpha_zero_negative_or_absurd_is_refused_with_file_and_module(trained, tmp_path, alpha):
    path = kohya_file(trained, tmp_path, _alphas(alpha))
    with pytest.raises(formats.AdapterError) as error:
        formats.read(path)
    assert str(path) in str(error.value) and "module" in str(error.value)


@pytest.mark.parametrize("alpha", [0, 1e9])
def test_the_same_alpha_rule_holds_for_diffusers_files(trained, tmp_path, alpha):
    source = trained / "pytorch_lora_weights.safetensors"
    tensors = load_file(str(source))
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
    peft = json.loads(metadata["lora_adapter_metadata"])
    for key in list(peft):
        if key.endswith("lora_alpha"):
            peft[key] = alpha
    metadata["lora_adapter_metadata"] = json.dumps(peft)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path), metadata)
    with pytest.raises(formats.AdapterError, match=str(path)):
        formats.read(path)


# --------------------------------------------------------------- class 8: no intention dropped silently

def test_a_kohya_folder_with_a_signed_repeat_count_is_refused(tmp_path):
    photos = tmp_path / "photos"
    for name in ("-3_sks dog", "2_sks dog"):
        (photos / name).mkdir(parents=True)
        make_photo(photos / name / "a.png", 0)
    with pytest.raises(ConfigError, match="-3_sks dog"):
        loading.resolve({"instance_dir": str(photos), "class_prompt": "a photo of dog",
                        "output_dir": str(tmp_path / "out")})


INTENTIONS = {
    "dataset= twice": ([], {}, "'dataset' is given 2 times"),
    "launch.processes=2 inside a one-process launcher": (["launch.processes=2"], {"WORLD_SIZE": "1", "RANK": "0"},
                                                         "WORLD_SIZE=1"),
    "WORLD_SIZE without MASTER_ADDR": ([], {"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
}


@pytest.mark.parametrize("case", INTENTIONS)
def test_no_intention_is_dropped_silently(tmp_path, photos, capsys, monkeypatch, case):
    extra, environment, message = INTENTIONS[case]
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    if case.startswith("dataset"):
        toml = tmp_path / "d.toml"
        toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{photos}'\n")
        extra = [f"dataset={toml}", f"dataset={toml}"]
    code, err = call(["train", "model=tiny", f"instance_dir={photos}", "instance_prompt=a photo of sks dog",
                      "class_prompt=a photo of dog", f"output_dir={tmp_path / 'out'}", "max_steps=1",
                      "train.device=cpu", "resolution=32", "num_class_images=1", *extra], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------- class 9: internal error means a bug

@pytest.mark.parametrize("failure", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:127] "
                                                                 "DefaultCPUAllocator: can't allocate memory")])
def test_an_allocation_failure_is_a_message_not_an_internal_error(tmp_path, capsys, monkeypatch, failure):
    from lora_booth.adapters import low_rank

    def allocate(*_, **__):
        raise failure
    monkeypatch.setattr(low_rank, "resize", allocate)
    code, err = call(["resize", f"in={tmp_path / 'a.safetensors'}", f"out={tmp_path / 'b.safetensors'}",
                      "rank=1"], capsys)
    assert code == 1 and "OutOfMemoryError" in err and "size=" in err and "internal error" not in err


# --------------------------------------------------------------- class 10: names that are not UTF-8

def test_names_that_are_not_utf8_train_and_report(tmp_path, capsys):
    photos = tmp_path / os.fsdecode(b"ph\xffotos")
    photos.mkdir()
    for index, name in enumerate([b"\xfe.png", b"a.png", b"b\xe9.png"]):
        make_photo(photos / os.fsdecode(name), index)
    out = tmp_path / os.fsdecode(b"r\xfeun")
    run(tiny_config(tmp_path, photos, max_steps=2, output_dir=out, **{"sample.num": 1, "sample.every": 2}),
        lambda *_: None)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "\\xfe.png" in page  # the photo's name, its odd byte escaped
    code, err = call(["report", str(out)], capsys)
    assert code == 0, err
    page = tmp_path / os.fsdecode(b"c\xfdmp.html")
    code, err = call(["report", str(out), f"out={page}"], capsys)
    assert code == 0 and page.is_file(), err


# --------------------------------------------------------------- class 11: documents are not an injection channel

# every payload only creates a marker file in the test's folder: on code that fails this test
# the shell really runs it, so nothing here may be destructive
PROMPTS = ['a photo of sks $(touch pwned) dog', 'a photo of `touch pwned` dog', 'sks dog" ; touch pwned ; echo "',
           "a photo of <img src=x onerror=alert(1)> dog", "a photo of sks ``` dog | x"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompts_in_the_model_card_are_quoted_and_escaped(tmp_path, photos, prompt):
    import subprocess

    from lora_booth.results import card

    cfg = tiny_config(tmp_path, photos, instance_prompt=prompt, **{"lora.type": "loha"})

    from lora_booth import families

    class Base:  # what the card asks of a loaded base model
        kind, family, prediction_type = families.family("sd1"), "sd1", "epsilon"
    out = tmp_path / "out"
    out.mkdir()
    text = card.write_model_card(out, cfg, Base(), 4, [out / "sks.safetensors"], None, 60).read_text()
    command = next(line for line in text.splitlines() if line.startswith("lora-booth generate"))
    # the card's command line, pasted into a shell (printf stands in for lora-booth): the shell hands
    # over exactly the prompt, and nothing in it runs
    printed = subprocess.run(["sh", "-c", command.replace("lora-booth generate", "printf '%s\\n'", 1)],
                             cwd=tmp_path, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
                             capture_output=True, text=True, timeout=30).stdout.splitlines()
    assert f"prompt={prompt}" in printed and not (tmp_path / "pwned").exists()
    import markdown_it
    rendered = markdown_it.MarkdownIt("commonmark").enable("table").render(text)
    assert "<img" not in rendered  # a prompt never becomes HTML
    row = rendered.split("trigger prompt</td>")[1].split("</tr>")[0]
    assert row.count("<td>") == 1 and "<code>" in row  # the whole prompt in one cell, as code


# --------------------------------------------------------------- class 13: messages point to the fix

def test_a_home_that_does_not_exist_names_the_cache_and_lora_booth_cache(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.delenv("LORA_BOOTH_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(blocker / "home"))  # cannot exist or be created, even as root
    code, err = call(["generate", "model=tiny", "prompt=x", f"out={tmp_path / 'o'}", "n=1", "steps=1"], capsys)
    assert code == 1 and "LORA_BOOTH_CACHE" in err and "cache folder" in err, err
