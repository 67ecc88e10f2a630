"""Verbs → public functions. Parsing of `key=value` only; no logic lives here."""
from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

from .config.help import _type_name, train_help
from .config.keys import shown
from .io.errors import ConfigError, LoraBoothError
from .io.version import __version__

USAGE = """usage: lora-booth <verb> [key=value ...]

verbs:
  train      train a DreamBooth LoRA        (lora-booth train --help lists every key)
  presets    list the presets and what each one sets
  plan       peak GPU memory and time of a training step, from configs alone: lora-booth plan preset=8gb
             model=sd15 [resolution=512] [train.gpu_memory=8GiB] (any train key; preset=auto picks one)
  convert    in=FILE|FOLDER to=kohya|diffusers out=FILE|FOLDER/ [dora=bake rank=N [base=MODEL]]: bake a DoRA
             adapter into a plain LoRA of rank N for ComfyUI/Forge/A1111, printing the approximation error
  merge      base=FOLDER|FILE|HUB_ID|toyworld lora=A.safetensors:0.8 [lora=...] out=FOLDER|FILE [dtype=same|fp16|bf16|fp32]
             without base: lora=A:1 lora=B:0.7 out=AB.safetensors [rank=N] combines adapters
  resize     in=FILE out=FILE rank=N | sv_fro=0.9
  extract    base=FOLDER tuned=FOLDER out=FILE rank=N
  inspect    FILE
  eval       lora=out/ [n=4 class_n=16 steps=25 clip=ID|DIR dino=ID|DIR ...]: DINO, CLIP-I, CLIP-T, prior
             drift and diversity (the DreamBooth paper's metrics) → out/eval.json. Toy-world adapters
             (or metrics=toyworld): lora=out/ [lora=...] [n=32] [prompt_following=true], the detector's table
  report     out/: write out/report.html again (summary, training photos, the sample grids of every step
             beside the base model's, curves, timings, config, eval scores). Several runs: report a/ b/
             [out=lora-booth-compare.html] [overwrite=true] compares them on one page
  generate   [model=MODEL] [lora=out/ lora=B.safetensors:0.6] prompt="a sks dog on the beach" out=images/
             [n=4 seed=0 steps= guidance= size= negative=...]; steps and guidance: the family's (SD 25 at 7.5,
             FLUX.1-dev 28 at 3.5, schnell 4); without model=, the base and size the first adapter was trained with
  ui         [host=127.0.0.1] [port=7860] [workspace=lora-booth-studio/] [token=...]: the studio, a local web app
             for datasets, runs and their queue (needs the [ui] extra; docs/ui.md)

Wherever a verb takes an adapter (lora=, in=, FILE), it may be a file, a run folder (out/) or a
checkpoint folder (out/checkpoints/step-500): each checkpoint holds the adapter of its step.

example:
  lora-booth train preset=demo output_dir=out/
  lora-booth train preset=24gb model=stable-diffusion-v1-5/stable-diffusion-v1-5 instance_dir=photos/ \\
      instance_prompt="a photo of sks dog" class_prompt="a photo of dog" output_dir=out/
"""


def parse_pairs(arguments: list[str]) -> list[tuple[str, str]]:
    """key=value pairs. `--key=value` and `--key value` (the spelling other trainers use) mean the
    same key=value; anything else without '=' is an error with the key=value hint."""
    pairs = []
    arguments = list(arguments)
    while arguments:
        argument = arguments.pop(0)
        if argument.startswith("--") and "=" not in argument and arguments and "=" not in arguments[0] \
                and not arguments[0].startswith("--"):
            argument = f"{argument}={arguments.pop(0)}"
        key, equals, value = argument.partition("=")
        if not equals or not key:
            raise ConfigError(argument, "is not a key=value pair",
                              "write settings as key=value, e.g. rank=8 (lora-booth train --help lists the keys)")
        pairs.append((key.lstrip("-"), value))
    return pairs


# `lora-booth eval metrics=dreambooth` only (lora_booth/evaluate.py)
DREAMBOOTH_EVAL_KEYS: dict[str, type] = {
    "instance_dir": str, "token": str, "class": str, "kind": str, "class_prompt": str, "class_n": int, "steps": int,
    "guidance": float, "size": int, "seed": int, "clip": str, "dino": str, "out": str}
VERB_KEYS: dict[str, dict[str, type]] = {
    "convert": {"in": str, "to": str, "out": str, "dora": str, "rank": int, "base": str, "allow_pickle": bool,
                "overwrite": bool},
    "merge": {"base": str, "lora": list, "out": str, "dtype": str, "rank": int, "overwrite": bool,
              "allow_pickle": bool},
    "resize": {"in": str, "out": str, "rank": int, "sv_fro": float, "overwrite": bool, "allow_pickle": bool},
    "extract": {"base": str, "tuned": str, "out": str, "rank": int, "overwrite": bool},
    "inspect": {"file": str, "allow_pickle": bool},
    "generate": {"model": str, "lora": list, "prompt": str, "negative": str, "n": int, "seed": int, "steps": int,
                 "guidance": float, "size": int, "out": str, "allow_pickle": bool, "overwrite": bool},
    "eval": {"model": str, "lora": list, "n": int, "prompt_following": bool, "metrics": str, **DREAMBOOTH_EVAL_KEYS},
    "report": {"dir": list, "out": str, "overwrite": bool},
    "ui": {"host": str, "port": int, "workspace": str, "token": str},
}
REQUIRED = {"convert": ("in", "to", "out"), "merge": ("lora", "out"), "resize": ("in", "out"),
            "extract": ("base", "tuned", "out", "rank"), "inspect": ("file",), "generate": ("prompt", "out"), "eval": ("lora",),
            "report": ("dir",), "ui": ()}


VERBS = ("train", "presets", "plan", *VERB_KEYS)
HELP_FLAGS = ("-h", "--help", "help")


def verb_help(verb: str) -> str:
    """`lora-booth VERB --help`: the verb's lines of the usage text and its keys."""
    lines = USAGE.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {verb} "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("             ")), len(lines))
    text = [f"usage: lora-booth {verb} [key=value ...]", "", *(line.strip() for line in lines[start:end])]
    if verb in VERB_KEYS:
        keys = VERB_KEYS[verb]
        required = REQUIRED.get(verb, ())
        text += ["", "keys:"] + [f"  {key}={_type_name(kind) if kind is not list else ('FOLDER (repeatable)' if key == 'dir' else 'FILE[:SCALE] (repeatable)')}"
                                 + ("   (required)" if key in required else "") for key, kind in keys.items()]
    return "\n".join(text)


def verb_arguments(verb: str, arguments: list[str]) -> dict:
    """key=value pairs of a file verb, typed; `lora` may repeat; inspect takes its file bare."""
    if verb == "inspect" and arguments and "=" not in arguments[0]:
        arguments = [f"file={arguments[0]}", *arguments[1:]]
    if verb == "report":  # report a/ b/: each bare folder is a dir= (the value of a `--key value` stays a value)
        arguments = [f"dir={arg}" if "=" not in arg and not arg.startswith("--") and not
                     (i and arguments[i - 1].startswith("--") and "=" not in arguments[i - 1]) else arg
                     for i, arg in enumerate(arguments)]
    allowed, values = VERB_KEYS[verb], {}
    for key, raw in parse_pairs(arguments):
        if key not in allowed:
            import difflib
            near = difflib.get_close_matches(key, list(allowed), n=1)
            raise ConfigError(key, f"is not a key of `lora-booth {verb}`",
                              f"did you mean '{near[0]}'?" if near else f"use {', '.join(allowed)}")
        kind = allowed[key]
        if kind is list:
            values.setdefault(key, []).append(raw)
        elif kind is bool:
            values[key] = raw.strip().lower() in ("true", "1", "yes", "on")
        else:
            try:
                values[key] = kind(raw)
            except ValueError:
                raise ConfigError(key, f"must be {'an integer' if kind is int else 'a number'}, not {shown(raw)}") from None
            check_verb_value(key, values[key])
    for key in REQUIRED[verb]:
        if key not in values:
            raise ConfigError(key, f"is missing: `lora-booth {verb}` needs {', '.join(REQUIRED[verb])}", "")
    return values


# numbers of the file verbs that must be at least 1 / positive / in (0, 1]
AT_LEAST_ONE = {"rank", "n", "steps", "class_n", "size"}
# the largest value each number of a file verb can mean: beyond it, a typo (size=51200) would
# allocate for minutes and then fail; a seed must fit the random generator's 64-bit state
CEILINGS = {"rank": (4096, "a LoRA's rank is at most a few hundred"),
            "n": (10_000, "draw images in batches of at most 10,000"),
            "class_n": (10_000, "a few hundred class images suffice"),
            "steps": (1000, "samplers take 20-50 steps; the schedulers have 1000 timesteps"),
            "size": (8192, "the models draw 512-2048 px"),
            "seed": (2**63 - 1, "a seed is a whole number from 0 to 2**63 - 1"),
            "guidance": (100.0, "7.5 is usual")}


def check_verb_value(key: str, value) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, not {value}")
    if key in AT_LEAST_ONE and value < 1:
        raise ConfigError(key, f"must be at least 1, not {value}")
    if key == "seed" and value < 0:
        raise ConfigError(key, f"must not be negative, not {value}", CEILINGS["seed"][1])
    if key in CEILINGS and value > CEILINGS[key][0]:
        ceiling, hint = CEILINGS[key]
        raise ConfigError(key, f"is {value:,}, more than the largest lora-booth accepts ({ceiling:,})", hint)
    if key == "guidance" and value < 0:
        raise ConfigError(key, f"must not be negative, not {value}", "7.5 is usual")
    if key == "sv_fro" and not 0 < value <= 1:
        raise ConfigError(key, f"must be in (0, 1], not {value}", "e.g. sv_fro=0.9 keeps 90 % of each update")


def run_eval(a: dict) -> None:
    from .results import evaluate

    if evaluate.choose_metrics(a) == "dreambooth":
        if "prompt_following" in a:
            raise ConfigError("prompt_following", "is a key of the toy world's metrics (metrics=toyworld)")
        evaluate.evaluate(a)
    else:
        run_toyworld_eval(a)


def run_toyworld_eval(a: dict) -> None:
    """The toy world's measured DreamBooth: subject hit rate, class correctness, diversity and
    drift, next to the base model, with its detector."""
    if a.get("model", "toyworld") != "toyworld":
        raise ConfigError("model", f"is {a['model']!r}; metrics=toyworld measures adapters of the toy world "
                          "(model=toyworld) only", "use metrics=dreambooth for other models")
    extra = sorted(set(a) & set(DREAMBOOTH_EVAL_KEYS))
    if extra:
        raise ConfigError(extra[0], "is a key of the DreamBooth metrics, not of the toy world's",
                          "drop it, or pass metrics=dreambooth")
    from .adapters.merging import parse_weighted
    from .model.loading import quiet_libraries
    from .training import toy_study as evaluate
    from .toyworld import toy_base_dir

    quiet_libraries()
    base = toy_base_dir()
    n, following = a.get("n", 32), a.get("prompt_following", False)
    rows = [evaluate.evaluate(base, None, "base", n=n, with_prompt_following=following)]
    for spec in a["lora"]:
        path, scale = parse_weighted(spec)
        rows.append(evaluate.evaluate(base, path, str(path), lora_scale=scale, n=n, with_prompt_following=following))
    print(evaluate.format_table(rows))


def run_file_verb(verb: str, arguments: list[str]) -> int:
    from .io import atomic, locking

    a = verb_arguments(verb, arguments)
    if "out" not in a or verb == "eval":
        return _run_file_verb(verb, a)
    out = Path(a["out"]).expanduser()
    with locking.exclusive(out, verb):  # one writer per output; then clear what a killed one left
        for folder in (out.parent, out):
            atomic.sweep_stale(folder)
        return _run_file_verb(verb, a)


def _run_file_verb(verb: str, a: dict) -> int:
    from .adapters import describe, formats, low_rank, merging as merge

    common = {"overwrite": a.get("overwrite", False)}
    if verb == "inspect":
        print(describe.describe(a["file"], a.get("allow_pickle", False)))
    elif verb == "convert":
        path = low_rank.convert(a["in"], a["to"], a["out"], a.get("dora", "keep"), a.get("rank"), a.get("base"),
                             a.get("allow_pickle", False), **common)
        print(f"wrote {path}")
    elif verb == "merge":
        loras = [merge.parse_weighted(spec) for spec in a["lora"]]
        if "base" in a:
            if "rank" in a:
                raise ConfigError("rank", "only applies when combining adapters (merge without base=)")
            dtype = a.get("dtype", "same")
            if dtype not in merge.MERGE_DTYPES:
                raise ConfigError("dtype", f"must be one of {', '.join(merge.MERGE_DTYPES)}, not {dtype!r}")
            merge.fuse(merge.base_path(a["base"], a.get("allow_pickle", False)), loras, Path(a["out"]), dtype,
                       allow_pickle=a.get("allow_pickle", False), **common)
        else:
            low_rank.combine(loras, Path(a["out"]), a.get("rank"), allow_pickle=a.get("allow_pickle", False), **common)
    elif verb == "resize":
        low_rank.resize(Path(a["in"]), Path(a["out"]), a.get("rank"), a.get("sv_fro"),
                     allow_pickle=a.get("allow_pickle", False), **common)
    elif verb == "extract":
        low_rank.extract(Path(a["base"]), Path(a["tuned"]), Path(a["out"]), a["rank"], **common)
    elif verb == "eval":
        run_eval(a)
    elif verb == "report":
        from .results import report
        print(f"wrote {report.write(a['dir'], a.get('out'), a.get('overwrite', False))}")
    elif verb == "generate":
        from .results import sample
        sample.generate(a.get("model", ""), [merge.parse_weighted(spec) for spec in a.get("lora", [])], a["prompt"],
                        Path(a["out"]), a.get("n", 4), a.get("seed", 0), a.get("steps"), a.get("guidance"),
                        a.get("size"), a.get("negative", ""), a.get("allow_pickle", False),
                        overwrite=a.get("overwrite", False))
    return 0


PLAN_PLACEHOLDERS = [("instance_dir", "(plan)"), ("instance_prompt", "a photo of sks dog"),
                     ("class_prompt", "a photo of dog"), ("output_dir", "(plan)")]


def run_plan(arguments: list[str]) -> int:
    """Train keys without the data a plan does not need; prints the plan and, when it does not
    fit, the settings that would."""
    from .planning import plan, presets, savers

    pairs = presets.family_preset([(k, v) for k, v in PLAN_PLACEHOLDERS] + parse_pairs(arguments))
    cfg, _ = presets.resolve(pairs)
    budget = presets.gpu_budget(cfg.train.gpu_memory)
    cfg = savers.resolve_auto(cfg, budget)  # train.offload_blocks=auto: the fewest blocks that fit
    estimate = plan.estimate(cfg)
    print(estimate.text(budget))
    if budget is not None and not estimate.fits(budget):
        print(f"memory savers, added in order until the plan fits {budget / 2**30:.1f} GiB:")
        fixes = presets.advice(pairs, budget)
        print(("settings that fit: " + " ".join(f"{k}={v}" for k, v, _ in fixes)) if fixes else
              "none of the savers suffice: lower data.resolution, or use a GPU with more memory")
        return 1
    return 0


def ignore_requests_until_the_loop() -> None:
    """SIGUSR1/SIGUSR2 (save now, sample now) are answered by the training loop; before it (loading,
    class images) and after it (the final save) their default action would end the process."""
    import signal

    for name in ("SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def relaunch(cfg, arguments: list[str]) -> int:
    """launch.processes=N: the same command under `accelerate launch` on this machine."""
    import socket
    import subprocess

    import torch

    with socket.socket() as probe:  # a free port for the process group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
               "--num_processes", str(cfg.launch.processes), "--mixed_precision", cfg.train.mixed_precision,
               "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "lora_booth", "train", *arguments]
    env = dict(os.environ)
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # data-parallel on CPU processes (gloo)
    print("relaunching: " + " ".join(command), flush=True)
    return subprocess.run(command, env=env).returncode


def check_launcher(processes: int, processes_given: bool) -> None:
    """What a launcher's environment says about the process group must agree with the config, or a
    run meant for several processes silently trains in one (or waits forever for a rendezvous)."""
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return
    if not world.strip().isdigit() or int(world) < 1:
        raise ConfigError("WORLD_SIZE", f"is {world[:40]!r} in the environment, not a number of processes",
                          "unset it, or start lora-booth with accelerate launch / torchrun")
    if processes_given and processes != int(world):
        raise ConfigError("launch.processes", f"is {processes}, but the launcher that started this process says "
                          f"WORLD_SIZE={world} processes", "drop launch.processes when you start lora-booth with a "
                          "launcher yourself, or run it without the launcher")
    if int(world) > 1 and not os.environ.get("MASTER_ADDR"):
        raise ConfigError("WORLD_SIZE", f"is {world} in the environment, but MASTER_ADDR is not set: the processes "
                          "have no address to meet at", "start lora-booth with accelerate launch or torchrun (they "
                          "set both), pass launch.processes=N, or unset WORLD_SIZE")


def run_train(arguments: list[str]) -> int:
    if any(a in ("-h", "--help", "help") for a in arguments):
        print(train_help())
        return 0
    from .planning.presets import resolve

    cfg, sources = resolve(parse_pairs(arguments), check_paths=True)
    check_launcher(cfg.launch.processes, "launch.processes" in sources)
    if cfg.launch.processes > 1 and "WORLD_SIZE" not in os.environ:
        return relaunch(cfg, arguments)
    for key, source in sorted(sources.items()) if os.environ.get("RANK", "0") == "0" else []:
        section, name = key.split(".", 1)
        print(f"  {key} = {getattr(getattr(cfg, section), name)!r}   ({source})")
    from .training.recipe import train
    train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if arguments else 2
    if arguments[0] in ("-V", "--version"):
        print(f"lora-booth {__version__}")
        return 0
    verb, rest = arguments[0], arguments[1:]
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints as \xNN, never a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers warns at import time that torchvision is missing; lora-booth never needs it
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        if verb in VERBS and verb != "train" and any(a in HELP_FLAGS for a in rest):
            print(verb_help(verb))
            return 0
        if verb == "train":
            ignore_requests_until_the_loop()
            return run_train(rest)
        if verb == "presets":
            from .planning.preset_table import presets_text
            print(presets_text())
            return 0
        if verb == "plan":
            return run_plan(rest)
        if verb == "ui":  # ui.host=… and host=… name the same key
            from .studio.server import serve
            return serve(verb_arguments(verb, [a[3:] if a.startswith("ui.") else a for a in rest]))
        if verb in VERB_KEYS:
            return run_file_verb(verb, rest)
        import difflib

        near = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f" Did you mean `lora-booth {near[0]}`?" if near else ""
        print(f"lora-booth: unknown verb {verb[:60]!r}.{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    except LoraBoothError as error:  # ours: the message is the whole story
        kind = ConfigError.__name__ if isinstance(error, ConfigError) else type(error).__name__  # one or several
        print(f"{kind}: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lora-booth … | head`: the reader has seen enough
        return 141
    except MemoryError:  # a number (size, batch, rank, a file's declared shape) asked for more than there is
        return out_of_memory(verb)
    except RuntimeError as error:
        if not is_allocation_failure(error):
            return internal_error(verb)
        return out_of_memory(verb)
    except OSError as error:  # a file that cannot be read or written: the path and the reason are the story
        where = f"{error.filename}: " if error.filename else ""
        print(f"{type(error).__name__}: {where}{error.strerror or error}. Check the path and its permissions.",
              file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - the last line, not the fix: a bug of ours, reported with its traceback saved
        return internal_error(verb)


def is_allocation_failure(error: BaseException) -> bool:
    """torch reports a failed allocation as a RuntimeError (CPU) or OutOfMemoryError (CUDA)."""
    text = str(error)
    return type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or \
        "out of memory" in text.lower()


def out_of_memory(verb: str) -> int:
    import traceback

    last = traceback.format_exc().strip().splitlines()[-1][:200]
    print(f"OutOfMemoryError: `lora-booth {verb}` asked for more memory than this machine has ({last}). Lower the "
          "numbers that size the work (size=, n=, rank=, data.resolution, train.batch_size), or check that the input "
          "files are what they claim to be.", file=sys.stderr)
    return 1


def internal_error(verb: str) -> int:
    import time
    import traceback

    from .families.tiny import cache_root

    text = traceback.format_exc()
    try:
        folder = cache_root() / "crashes"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{verb}.txt"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)  # never via a link
        with open(fd, "w", encoding="utf-8") as handle:
            handle.write(f"lora-booth {__version__} {verb}\n{text}")
        saved = f"The traceback is saved in {path}"
    except (OSError, LoraBoothError):
        saved = "The traceback could not be saved"
    last = text.strip().splitlines()[-1][:300]
    print(f"internal error in `lora-booth {verb}` ({last}). This is a bug in lora-booth, not in your input: "
          f"please report it with the command you ran. {saved}.", file=sys.stderr)
    return 70
