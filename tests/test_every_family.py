"""Rules that must hold for every model family, checked on each family's real parts (tiny SD 1.x,
SDXL and FLUX.1 built from configs): a rule keyed on one family's names silently skips the others."""
import pytest
import torch

from lora_booth.model import lora, loading as models
from lora_booth.training import optim
from lora_booth.config.sections import Config, LoraConfig, ModelConfig
from lora_booth.io.errors import ConfigError
from lora_booth.families.tiny import TINY_NAMES
from lora_booth.adapters import file_metadata
from lora_booth.adapters import low_rank

FAMILY_OF = {"tiny": "sd1", "tiny-sdxl": "sdxl", "tiny-flux": "flux", "tiny-flux2": "flux2", "tiny-zimage": "zimage",
             "tiny-qwenimage": "qwenimage"}


@pytest.fixture(scope="module", params=TINY_NAMES)
def tiny_source(request):
    return request.param


def adapted(source: str, kind: str = "lora"):
    """The frozen tiny base of that name with adapters on its denoiser and every trainable text encoder."""
    base = models.load_frozen(ModelConfig(source=source))
    assert base.family == FAMILY_OF[source]
    params = lora.add_adapters(base, LoraConfig(rank=2, text_encoder=True, type=kind), seed=0)
    return base, params


def test_loraplus_splits_every_part_of_every_family(tiny_source):
    """Every lora_B of every part (the denoiser under its own name: unet or transformer) learns at
    lr × ratio, every other adapter tensor at lr; one AdamW step from B = 0 moves B by ratio × lr."""
    base, params = adapted(tiny_source)
    assert base.kind.denoiser in params  # unet, or FLUX.1's transformer
    cfg = Config().optim
    cfg.lr, cfg.loraplus_ratio, cfg.weight_decay = 1e-4, 16.0, 0.0
    up = lora.up_matrices(base)
    optimizer = optim.build_optimizer(params, cfg, 1, up)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for part, tensors in params.items():
        ups = [p for p in tensors if id(p) in up]
        assert ups, f"{part}: no lora_B found"
        assert [rate[id(p)] for p in ups] == pytest.approx([1.6e-3] * len(ups)), part
        rest = [rate[id(p)] for p in tensors if id(p) not in up]
        assert rest and rest == pytest.approx([1e-4] * len(rest)), part
    b = next(p for p in params[base.kind.denoiser] if id(p) in up)
    before = b.detach().clone()
    for tensors in params.values():
        for p in tensors:
            p.grad = torch.ones_like(p)
    optimizer.step()
    assert (b.detach() - before).abs().max().item() == pytest.approx(1.6e-3, rel=1e-3)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loraplus_is_refused_without_lora_b_in_every_family(tiny_source, kind):
    base, params = adapted(tiny_source, kind)
    cfg = Config().optim
    cfg.loraplus_ratio = 16.0
    with pytest.raises(ConfigError, match=f"the {base.kind.denoiser} adapters have no lora_B"):
        optim.build_optimizer(params, cfg, 1, lora.up_matrices(base))


def test_kohya_network_dim_is_the_denoisers_rank_in_every_family(tiny_source):
    """ss_network_dim/alpha state the denoiser's rank (the UNet's or the transformer's), not the text
    encoders' where those have more modules."""
    from lora_booth.adapters import formats

    base = models.load_frozen(ModelConfig(source=tiny_source))
    one = next(name for name, _ in base.unet.named_modules() if name.endswith("to_q"))  # one denoiser module
    lora.add_adapters(base, LoraConfig(rank=2, alpha=1, targets=(one,), text_encoder=True, text_encoder_rank=4),
                      seed=0)
    adapter = formats.from_model(base)
    parts = [part for part, _ in adapter.modules]
    if base.kind.trainable_text_parts():  # (FLUX.2 klein, Z-Image and Qwen-Image train no text encoder)
        assert parts.count(base.kind.denoiser) < len(parts) / 2  # the text encoders' modules are the majority
    metadata = file_metadata.kohya_file_metadata(adapter, {}, base.family)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("2", "1.0")


def test_extract_reads_the_denoiser_of_every_family(tiny_source, tmp_path):
    """`extract` finds a changed attention projection of the denoiser, whatever its folder is called."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lora_booth.adapters import formats
    from lora_booth.families.tiny import tiny_model_dir

    base_dir = tiny_model_dir(tiny_source)
    denoiser = models.families.family(FAMILY_OF[tiny_source]).denoiser
    tuned = tmp_path / "tuned"
    shutil.copytree(base_dir, tuned)
    weights = tuned / denoiser / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = sorted(k for k in state if k.endswith("to_q.weight"))[0]
    change = torch.outer(torch.linspace(-1, 1, state[key].shape[0]), torch.linspace(1, 2, state[key].shape[1]))
    state[key] = state[key] + change
    save_file(state, str(weights))
    out = low_rank.extract(base_dir, tuned, tmp_path / "x.safetensors", rank=1, report=lambda *_: None)
    extracted = formats.read(out)
    module = (denoiser, key[:-len(".weight")])
    assert list(extracted.modules) == [module]
    assert torch.allclose(extracted.modules[module].delta(), change, atol=1e-5)


def test_kohya_names_the_denoiser_lora_unet_in_every_family():
    """sd-scripts writes every family's denoiser as lora_unet_… (FLUX.1's transformer too)."""
    from lora_booth import families

    for family in families.FAMILIES.values():
        assert family.kohya_prefix(family.denoiser) == "lora_unet_", family.name
