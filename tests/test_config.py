import pytest

from lora_booth.config import sections as config
from lora_booth.config import loading
from lora_booth.config import keys
from lora_booth.config.help import train_help
from lora_booth.io.errors import ConfigError

REQUIRED = {"model": "tiny", "instance_dir": "photos", "instance_prompt": "a photo of sks dog",
            "class_prompt": "a photo of dog", "output_dir": "out"}


def resolve(**pairs):
    return loading.resolve({**REQUIRED, **pairs})


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"(?i)'lora.rnak'.*did you mean 'lora.rank'"):
        resolve(**{"lora.rnak": "8"})
    with pytest.raises(ConfigError, match=r"(?i)'rnak'.*did you mean 'rank'"):
        resolve(rnak="8")


def test_aliases_and_dotted_keys_set_the_same_field():
    cfg, sources = resolve(rank="8", **{"prior.weight": "0.5"})
    assert cfg.lora.rank == 8 and cfg.prior.weight == 0.5
    assert sources["lora.rank"] == "the command line"


@pytest.mark.parametrize("key,value,message", [
    ("rank", "eight", "must be an integer"),
    ("rank", "0", "must be positive"),
    ("train.mixed_precision", "fp8", "must be one of no, fp16, bf16"),
    ("data.flip", "maybe", "must be true or false"),
    ("resolution", "500", "multiple of 8"),
    ("lora.dropout", "1.5", r"\[0, 1\)"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        resolve(**{key: value})


def test_prior_needs_a_class_prompt_unless_off():
    pairs = {k: v for k, v in REQUIRED.items() if k != "class_prompt"}
    with pytest.raises(ConfigError, match="prior.class_prompt.*prior.weight=0"):
        loading.resolve(pairs)
    cfg, _ = loading.resolve({**pairs, "prior.weight": "0"})
    assert cfg.prior.weight == 0


def test_random_crop_conflicts_with_cached_latents():
    with pytest.raises(ConfigError, match="data.crop"):
        resolve(**{"data.crop": "random"})
    cfg, _ = resolve(**{"data.crop": "random", "data.cache_latents": "false"})
    assert cfg.data.crop == "random"


def test_layers_apply_in_order(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text("lora:\n  rank: 12\noptim:\n  lr: 3.0e-4\nseed: 7\n")
    cfg, sources = loading.resolve([("preset", "6gb"), ("config", str(user)), ("lr", "5e-5"), *REQUIRED.items()])
    assert cfg.lora.rank == 12 and sources["lora.rank"] == str(user)          # file beats preset
    assert cfg.optim.lr == 5e-5 and sources["optim.lr"] == "the command line"  # command line beats file
    assert cfg.train.seed == 7
    assert cfg.train.gradient_checkpointing is True and sources["train.gradient_checkpointing"] == "preset 6gb"


def test_preset_position_on_the_command_line_does_not_matter():
    late, _ = loading.resolve([("rank", "3"), *REQUIRED.items(), ("preset", "24gb")])
    assert late.lora.rank == 3


def test_unknown_preset_suggests_one():
    with pytest.raises(ConfigError, match="(?i)did you mean .(8gb|6gb)."):
        resolve(preset="8g")


def test_unknown_key_in_a_config_file_names_the_file(tmp_path):
    user = tmp_path / "bad.yaml"
    user.write_text("lora:\n  rnak: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*lora.rank"):
        resolve(config=str(user))


@pytest.mark.parametrize("name", loading.preset_names())
def test_every_preset_validates(name):
    cfg, sources = loading.resolve({"preset": name, **REQUIRED})
    assert any(source == f"preset {name}" for source in sources.values())


def test_presets_start_with_their_run_command():
    for name in loading.preset_names():
        text = (loading.presets_dir() / f"{name}.yaml").read_text()
        assert f"lora-booth train preset={name}" in text


def test_help_lists_every_key_with_its_doc():
    text = train_help(width=10_000)
    for key in keys.all_keys():
        assert f"  {key} = " in text, key
    assert keys.field_docs(config.PriorConfig)["weight"] in text
    assert "(also: rank)" in text


def test_help_opens_with_the_common_keys_and_wraps_to_the_terminal():
    from lora_booth.config.help import COMMON_KEYS

    text = train_help(width=72)
    common = text[text.index("Most runs set these:"):text.index("[model]")]
    assert [line.split(" = ")[0].strip() for line in common.splitlines() if " = " in line] == list(COMMON_KEYS)
    assert all(len(line) <= 72 or " " not in line.strip() for line in text.splitlines()[1:])


def test_every_field_has_a_docstring():
    for section, cls in config.SECTIONS.items():
        documented = keys.field_docs(cls)
        for key in keys.all_keys():
            if key.startswith(section + "."):
                assert key.split(".", 1)[1] in documented, key


def test_saved_config_round_trips():
    cfg, _ = resolve(rank="8", **{"lora.targets": "to_q,to_v"})
    again = loading.from_dict(cfg.to_dict())
    assert again == cfg and again.lora.targets == ("to_q", "to_v")


@pytest.mark.parametrize("name", ["../../../tmp/evil", "/etc/hosts", "..", "24gb/../24gb", "a\\b", ""])
def test_a_preset_is_a_name_never_a_path(tmp_path, name):
    """preset= names a shipped preset; a path (relative, absolute, with ..) is refused before any
    file is read, so neither the CLI nor the studio reads a .yaml outside the presets."""
    (tmp_path / "evil.yaml").write_text("lora:\n  rank: 7\n")
    with pytest.raises(ConfigError, match="preset"):
        loading.read_preset(name.replace("/tmp/evil", str(tmp_path / "evil")))
