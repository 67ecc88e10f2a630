"""Bit-exact resume after a SIGKILL at any moment (issue #29, class 12), not at a few chosen ones.

A census run counts every moment where a kill could land differently: each file-system call that
lora-booth code makes (create, write, rename, fsync, delete: in the lock, the manifest, the
config, class images, latent caching, each checkpoint write and prune, the final save and the
extras), each training step and each logged step. Each distinct moment (the call, and where in
lora-booth it comes from) is one phase; a run is then SIGKILLed at the first moment of every phase
in turn, resumed with resume=latest, and compared tensor by tensor with the uninterrupted run.

The runs are forked from the test process (torch already imported), so each costs the training
itself rather than an interpreter start: about a second on the tiny model."""
import functools
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_photos

PACKAGE = str(Path(__file__).resolve().parents[1] / "lora_booth")
FILE_CALLS = ("open", "replace", "rename", "unlink", "rmdir", "mkdir", "fsync", "ftruncate", "write", "makedirs")


def arguments(root: Path, photos: Path) -> list[str]:
    return ["train", f"instance_dir={photos}", "model=tiny", "instance_prompt=a photo of sks dog",
            "class_prompt=a photo of dog", f"class_dir={root / 'class'}", "num_class_images=2",
            "prior.sample_steps=2", f"output_dir={root / 'out'}", "resolution=32", "max_steps=5", "rank=2",
            "lr=1e-2", "train.device=cpu", "save.checkpoint_every=2", "save.keep=1", "train.grad_accum=2",
            "optim.schedule=cosine", "optim.warmup_steps=2", "lora.dropout=0.1", "data.flip=true",
            "sample.num=1", "sample.steps=2", "sample.every=2"]


STDLIB_HELPERS = ("tempfile.py", "shutil.py", "pathlib.py")
HELPERS = ("atomic", "manifest")   # the writing helpers: the phase is who calls them


def where_in_lora_booth() -> str | None:
    """Where a call comes from: the innermost lora-booth function, the innermost one that is not a
    writing helper (the phase: a checkpoint, a class image, the card...), and the recipe's function
    around it (a checkpoint's adapter files and the final ones are different moments)."""
    frame, names = sys._getframe(2), []
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE):
            names.append(f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}")
        frame = frame.f_back
    if not names:
        return None
    origin = next((n for n in names if n.split(".")[0] not in HELPERS), names[-1])
    # the recipe's own modules: recipe.py and resume.py (where its checkpoints are written)
    context = next((n for n in names if n.startswith(("recipe.", "resume.")) and "<" not in n), "")
    return f"{names[0]}<{origin} in {context}"


def install_moments(kill_at: str | None, census: Path | None) -> None:
    """Count the moments of this process; SIGKILL it at the first moment named `kill_at`."""
    seen: set[str] = set()

    def moment(what: str) -> None:
        place = where_in_lora_booth()
        if place is None:
            return
        name = f"{what}@{place}"
        if name in seen:
            return
        seen.add(name)
        if census is not None:
            with open(census, "a") as handle:
                handle.write(name + "\n")
        if name == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def watched(what, function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            # calls that lora-booth makes (directly, or through the standard library's file helpers),
            # not those a library makes on its own account (matplotlib creating its cache once)
            caller = Path(sys._getframe(1).f_code.co_filename)
            if not (str(caller).startswith(PACKAGE) or caller.name in STDLIB_HELPERS):
                return function(*args, **kwargs)
            moment(f"before {what}")
            result = function(*args, **kwargs)
            moment(f"after {what}")
            return result
        return call

    for name in FILE_CALLS:
        setattr(os, name, watched(f"os.{name}", getattr(os, name)))
    shutil.rmtree = watched("rmtree", shutil.rmtree)
    import safetensors.torch

    safetensors.torch.save_file = watched("save_file", safetensors.torch.save_file)
    from lora_booth.data import batches as data
    from lora_booth.training import recipe

    data.LatentSource._encode = watched("a VAE encoding", data.LatentSource._encode)  # latent caching
    recipe.training_step = watched("a training step", recipe.training_step)
    recipe.log_metrics = watched("a step's log line", recipe.log_metrics)


def forked(args: list[str], log: Path, kill_at: str | None = None, census: Path | None = None) -> int:
    """Run `lora-booth args` in a forked child; its exit code, or -9 when it was killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            install_moments(kill_at, census)
            from lora_booth.cli import main

            code = main(args)
        except BaseException:  # noqa: BLE001 - reported through the exit code and the log
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 70)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_dir):
    """The uninterrupted run: its adapter, and the phases (moments) a run goes through (the tiny
    model is built beforehand: it is the test's model, shared by every run, not the run's work)."""
    root = tmp_path_factory.mktemp("straight")
    photos = make_photos(root)
    census = root / "moments.txt"
    assert forked(arguments(root, photos), root / "log.txt", census=census) == 0, (root / "log.txt").read_text()
    moments = census.read_text().splitlines()
    return photos, load_file(str(root / "out/pytorch_lora_weights.safetensors")), moments


def test_the_census_reaches_every_phase(straight):
    _, _, moments = straight
    text = "\n".join(moments)
    for phase in ("a VAE encoding@batches.build_cache",
                  "locking.exclusive", "prior.generate", "checkpoint.save", "checkpoint.remove", "a training step",
                  "kohya_layout.write_kohya in recipe.run_locked",
                  "kohya_layout.write_kohya in resume.shareable_files",
                  "card.write_model_card", "a step's log line", "preparation._prepare_output_dir",
                  "sample.save_png", "report.write_report", "recipe.write_run_summary"):
        assert phase in text, phase


def spread(moments: list[str]) -> list[str]:
    """The moments to kill at: all of them with LORA_BOOTH_EVERY_MOMENT=1 (about 200; many minutes),
    else, of the moments after a call (a kill before a call leaves what the one after the previous
    call left), the first of every phase (who makes the call: a class image, the config, a
    checkpoint, the final adapters, the card...) and, in checkpoints and their pruning, the moment
    after each rename and delete, where a run is most often caught between two states."""
    if os.environ.get("LORA_BOOTH_EVERY_MOMENT") == "1":
        return moments
    after = [m for m in moments if not m.startswith("before ")]
    landing = ("os.replace", "os.rename")    # a file or folder has just appeared under its final name
    leaving = ("os.unlink", "os.rmdir", "rmtree")
    chosen = []
    for phase in dict.fromkeys(m.split("<", 1)[1] for m in after):
        inside = [m for m in after if m.split("<", 1)[1] == phase]
        landed = [m for m in inside if any(f" {op}@" in m for op in landing)]
        if phase.startswith("checkpoint."):
            chosen += [m for m in inside if any(f" {op}@" in m for op in landing + leaving)] or inside[:1]
        else:
            chosen += landed[:1] or inside[:1]
    return chosen


def test_a_sigkill_at_a_moment_of_every_phase_then_resume_is_bit_identical(tmp_path, straight):
    photos, expected, moments = straight
    broken = []
    for index, moment in enumerate(spread(moments)):
        root = tmp_path / f"kill-{index:03d}"
        root.mkdir()
        args = arguments(root, photos)
        killed = forked(args, root / "log.txt", kill_at=moment)
        if killed != -signal.SIGKILL:
            broken.append(f"{moment}: not killed (exit {killed})")
            continue
        resumed = forked(args + ["resume=latest"], root / "log.txt")
        if resumed != 0:
            broken.append(f"{moment}: resume=latest exits {resumed}: {(root / 'log.txt').read_text()[-1500:]}")
            continue
        tensors = load_file(str(root / "out/pytorch_lora_weights.safetensors"))
        if tensors.keys() != expected.keys() or not all(torch.equal(tensors[k], expected[k]) for k in tensors):
            broken.append(f"{moment}: the resumed adapter differs from the uninterrupted run's")
        leftovers = [p for p in root.rglob("*") if p.name.startswith(".lora-booth-tmp-") or
                     p.name.endswith(".lora-booth.lock")]
        if leftovers:
            broken.append(f"{moment}: left {leftovers}")
        shutil.rmtree(root)
    assert not broken, "\n".join(broken)
