import pytest
import torch
from diffusers import DDPMScheduler

from lora_booth.model import objective
from lora_booth.families import noise as families_noise
from lora_booth.config import loading


def scheduler(prediction_type="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=prediction_type)


def test_loss_is_instance_plus_lambda_prior():
    pred = torch.zeros(4, 4, 2, 2)
    target = torch.stack([torch.full((4, 2, 2), v) for v in (1.0, 2.0, 3.0, 4.0)])
    is_prior = torch.tensor([False, False, True, True])
    losses = objective.dreambooth_loss(pred, target, is_prior, prior_weight=0.5)
    instance, prior = (1 + 4) / 2, (9 + 16) / 2
    assert losses.instance.item() == pytest.approx(instance)
    assert losses.prior.item() == pytest.approx(prior)
    assert losses.total.item() == pytest.approx(instance + 0.5 * prior)


def test_loss_does_not_depend_on_row_order():
    pred, target = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    is_prior = torch.tensor([False, True, False, True])
    order = torch.tensor([3, 0, 2, 1])
    a = objective.dreambooth_loss(pred, target, is_prior, 1.0)
    b = objective.dreambooth_loss(pred[order], target[order], is_prior[order], 1.0)
    assert torch.allclose(a.total, b.total)


def test_without_prior_rows_the_prior_term_is_zero():
    losses = objective.dreambooth_loss(torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2),
                                       torch.tensor([False, False]), 1.0)
    assert losses.prior.item() == 0 and losses.total.item() == pytest.approx(1.0)


def test_fp16_residuals_do_not_underflow():
    pred = torch.full((2, 4, 2, 2), 1e-4, dtype=torch.float16)
    losses = objective.dreambooth_loss(pred, torch.zeros_like(pred), torch.tensor([False, True]), 1.0)
    assert losses.total.item() > 0


def test_targets_follow_the_prediction_type():
    latents, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    timesteps = torch.tensor([10, 900])
    assert torch.equal(families_noise.denoising_target(scheduler(), latents, noise, timesteps), noise)
    v_scheduler = scheduler("v_prediction")
    v = families_noise.denoising_target(v_scheduler, latents, noise, timesteps)
    alpha_bar = v_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    assert torch.allclose(v, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents, atol=1e-5)


def test_min_snr_weights():
    s = scheduler()
    timesteps = torch.tensor([1, 999])
    weights = objective.snr_weights(s, timesteps, 5.0)
    snr = s.alphas_cumprod[timesteps] / (1 - s.alphas_cumprod[timesteps])
    assert weights[0].item() == pytest.approx(5.0 / snr[0].item(), rel=1e-4)  # high SNR: clipped
    assert weights[1].item() == pytest.approx(1.0)                          # low SNR: weight 1 for ε
    assert objective.snr_weights(s, timesteps, 0.0) is None
    v_weights = objective.snr_weights(scheduler("v_prediction"), timesteps, 5.0)
    assert v_weights[1].item() == pytest.approx(snr[1].item() / (snr[1].item() + 1), rel=1e-4)


def test_noise_is_reproducible_and_offset_shifts_channels():
    latents = torch.zeros(2, 4, 8, 8)

    def generators(seed=3):
        return [torch.Generator().manual_seed(seed + i) for i in range(2)]
    a = families_noise.sample_noise(latents, 1000, generators())
    b = families_noise.sample_noise(latents, 1000, generators())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    single = families_noise.sample_noise(latents[1:], 1000, generators()[1:])  # a row's draw ignores its batch
    assert torch.equal(single[0][0], a[0][1]) and single[1][0] == a[1][1]
    offset, _ = families_noise.sample_noise(latents, 1000, generators(), objective_config(noise_offset=10.0))
    assert offset.mean(dim=(2, 3)).abs().mean() > 1.0  # per-channel constant added


# ------------------------------------------------------------------ loss and timestep options (issue #18)

def objective_config(**values):
    from lora_booth.config.sections import ObjectiveConfig

    return ObjectiveConfig(**values)


def test_mse_default_is_the_plain_mean_of_squares_bit_for_bit():
    """The default numbers of every run before these options: F.mse_loss, per-row mean, then λ."""
    pred, target = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    is_prior = torch.tensor([False, True, False, True])
    losses = objective.dreambooth_loss(pred, target, is_prior, 0.7)
    per_row = torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    instance, prior = per_row[~is_prior].sum() / 2, per_row[is_prior].sum() / 2
    assert torch.equal(losses.instance, instance) and torch.equal(losses.prior, prior)
    assert torch.equal(losses.total, instance + 0.7 * prior)
    assert objective.huber_c(scheduler(), torch.tensor([3, 500]), objective_config()) is None


def test_huber_and_smooth_l1_match_a_hand_computation():
    """3-4-5 triangles make the square roots exact: r = 0.3, c = 0.4 → √(r² + c²) = 0.5, so
    huber = 2·0.4·(0.5 − 0.4) = 0.08 and smooth_l1 = 2·(0.5 − 0.4) = 0.2; r = 1.2, c = 0.5 →
    √ = 1.3, huber = 2·0.5·0.8 = 0.8, smooth_l1 = 1.6. Each row has its own c."""
    pred = torch.stack([torch.full((1, 2, 2), 0.3), torch.full((1, 2, 2), -1.2)])  # (2, 1, 2, 2)
    target = torch.zeros_like(pred)
    c = torch.tensor([0.4, 0.5])
    is_prior = torch.tensor([False, True])
    huber = objective.dreambooth_loss(pred, target, is_prior, 2.0, loss="huber", c=c)
    assert huber.instance.item() == pytest.approx(0.08, rel=1e-6)
    assert huber.prior.item() == pytest.approx(0.8, rel=1e-6)
    assert huber.total.item() == pytest.approx(0.08 + 2 * 0.8, rel=1e-6)
    smooth = objective.dreambooth_loss(pred, target, is_prior, 2.0, loss="smooth_l1", c=c)
    assert smooth.instance.item() == pytest.approx(0.2, rel=1e-6)
    assert smooth.prior.item() == pytest.approx(1.6, rel=1e-6)


def test_pseudo_huber_per_element_then_mean_against_float64():
    """Random residuals, c per row: the mean over elements of 2c(√(r² + c²) − c), computed
    directly in float64, and its two limits (r² near 0, 2c|r| − 2c² far out)."""
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5, generator=generator), torch.randn(3, 4, 5, 5, generator=generator)
    c = torch.tensor([0.05, 0.1, 1.0])
    r, c64 = (pred - target).double(), c.double().view(-1, 1, 1, 1)
    for kind, expected in (("huber", 2 * c64 * (torch.sqrt(r ** 2 + c64 ** 2) - c64)),
                           ("smooth_l1", 2 * (torch.sqrt(r ** 2 + c64 ** 2) - c64))):
        rows = objective.elementwise_loss(pred, target, kind, c).mean(dim=(1, 2, 3))
        assert torch.allclose(rows.double(), expected.mean(dim=(1, 2, 3)), rtol=1e-6)
    tiny, large = torch.tensor([[1e-3]]), torch.tensor([[1e3]])
    zero, one = torch.zeros(1, 1), torch.tensor([1.0])
    assert objective.elementwise_loss(tiny, zero, "huber", one).item() == pytest.approx(1e-6, rel=1e-5)
    assert objective.elementwise_loss(large, zero, "huber", one).item() == pytest.approx(2e3 - 2, rel=1e-5)


def test_pseudo_huber_keeps_small_fp16_residuals():
    """Upcast before squaring, and √(r² + c²) − c without cancellation: r = 1e-4 in fp16 with
    c = 0.1 matches float64 to 1e-4 (the direct form in fp32 is 4 % off there)."""
    pred = torch.full((2, 4, 2, 2), 1e-4, dtype=torch.float16)
    c = torch.full((2,), 0.1)
    r = float(pred[0, 0, 0, 0])  # the fp16 value
    expected = 2 * 0.1 * ((r * r + 0.01) ** 0.5 - 0.1)  # float64 in Python
    losses = objective.dreambooth_loss(pred, torch.zeros_like(pred), torch.tensor([False, True]), 1.0,
                                       loss="huber", c=c)
    assert losses.instance.item() == pytest.approx(expected, rel=1e-4)
    assert losses.prior.item() == pytest.approx(expected, rel=1e-4)


def test_huber_schedules_give_c_t_by_their_formulas():
    s = scheduler()
    timesteps = torch.tensor([0, 1, 250, 500, 999])
    t = timesteps.double()
    constant = objective.huber_c(s, timesteps, objective_config(loss="huber", huber_schedule="constant", huber_c=0.2))
    assert torch.allclose(constant, torch.full((5,), 0.2))
    exponential = objective.huber_c(s, timesteps, objective_config(loss="huber", huber_schedule="exponential"))
    expected = torch.exp(-t * torch.log(torch.tensor(1 / 0.1, dtype=torch.float64)) / 1000)  # c^(t/T)
    assert torch.allclose(exponential.double(), expected, rtol=1e-6)
    assert exponential[0].item() == 1.0 and exponential[3].item() == pytest.approx(0.1 ** 0.5, rel=1e-6)
    snr = objective.huber_c(s, timesteps, objective_config(loss="smooth_l1", huber_schedule="snr", huber_c=0.1))
    alpha_bar = s.alphas_cumprod.double()[timesteps]
    sigma = torch.sqrt((1 - alpha_bar) / alpha_bar)
    assert torch.allclose(snr.double(), (1 - 0.1) / (1 + sigma) ** 2 + 0.1, rtol=1e-5)
    assert snr[0] > 0.9 and snr[-1] < 0.11 and bool((snr[1:] <= snr[:-1]).all())  # 1 → c as noise grows


def test_min_snr_weights_and_the_prior_split_work_with_huber():
    pred, target = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    is_prior = torch.tensor([False, True, True, False])
    c, weights = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.0, 0.5, 0.25, 2.0])
    per_row = objective.elementwise_loss(pred, target, "huber", c).mean(dim=(1, 2, 3)) * weights
    losses = objective.dreambooth_loss(pred, target, is_prior, 0.5, weights, loss="huber", c=c)
    assert losses.instance.item() == pytest.approx(((per_row[0] + per_row[3]) / 2).item(), rel=1e-6)
    assert losses.prior.item() == pytest.approx(((per_row[1] + per_row[2]) / 2).item(), rel=1e-6)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = objective.dreambooth_loss(pred[order], target[order], is_prior[order], 0.5, weights[order],
                                         loss="huber", c=c[order])
    assert torch.allclose(shuffled.total, losses.total)


def generators_for(seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.mark.parametrize("distribution", ["uniform", "logit_normal", "shifted"])
def test_timestep_draws_follow_their_formula_from_the_rows_generator(distribution):
    """Each row's generator draws its noise first, then its timestep: reproduce both by hand."""
    cfg = objective_config(timesteps=distribution, logit_mean=0.5, logit_std=1.5, timestep_shift=3.0)
    latents, seeds = torch.zeros(64, 4, 2, 2), range(100, 164)
    noise, timesteps = families_noise.sample_noise(latents, 1000, generators_for(seeds), cfg)
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        assert torch.equal(noise[row], torch.randn((4, 2, 2), generator=generator))
        if distribution == "uniform":
            expected = int(torch.randint(0, 1000, (), generator=generator))
        elif distribution == "logit_normal":
            z = float(torch.randn((), generator=generator, dtype=torch.float64))
            expected = int(1000 / (1 + __import__("math").exp(-(0.5 + 1.5 * z))))
        else:
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            expected = int(1000 * 3 * u / (1 + 2 * u))
        assert int(timesteps[row]) == min(expected, 999)
    assert timesteps.dtype == torch.int64 and 0 <= int(timesteps.min()) and int(timesteps.max()) <= 999
    same_noise, _ = families_noise.sample_noise(latents, 1000, generators_for(seeds), objective_config())
    assert torch.equal(noise, same_noise)  # the distribution changes t only


def test_timestep_distributions_lean_where_they_should():
    """Over 4000 draws: logit-normal(0, 1) is centred and thinner at both ends than uniform;
    a shift of 3 moves the median from T/2 to about 3T/4."""
    latents, seeds = torch.zeros(4000, 1, 1, 1), range(4000)

    def draws(**values):
        return families_noise.sample_noise(latents, 1000, generators_for(seeds), objective_config(**values))[1].double()
    uniform, logit, shifted = draws(), draws(timesteps="logit_normal"), draws(timesteps="shifted")
    assert abs(uniform.median().item() - 500) < 30 and abs(logit.median().item() - 500) < 30
    ends = lambda t: ((t < 100) | (t >= 900)).double().mean().item()  # noqa: E731
    assert ends(logit) < ends(uniform) / 2
    assert abs(shifted.median().item() - 750) < 30
    unshifted = draws(timesteps="shifted", timestep_shift=1.0)
    assert abs(unshifted.median().item() - 500) < 30


def test_loss_and_timestep_options_are_validated():
    from lora_booth.io.errors import ConfigError

    base = {"model": "tiny", "instance_dir": "x", "instance_prompt": "a photo of sks dog",
            "class_prompt": "a photo of dog", "output_dir": "x"}
    cfg, _ = loading.resolve({**base, "objective.loss": "smooth_l1", "objective.timesteps": "logit_normal"})
    assert cfg.objective.huber_schedule == "snr" and cfg.objective.huber_c == 0.1
    for key, value, message in (("objective.huber_c", "0", "must be positive"),
                                ("objective.huber_c", "2", "at most 1"),
                                ("objective.logit_std", "0", "must be positive"),
                                ("objective.timestep_shift", "0.5", "at least 1"),
                                ("objective.loss", "l1", "must be one of")):
        with pytest.raises(ConfigError, match=message):
            loading.resolve({**base, key: value})
    cfg, _ = loading.resolve({**base, "objective.huber_c": "2", "objective.huber_schedule": "constant"})
    assert cfg.objective.huber_c == 2.0


def test_the_model_card_names_a_non_default_objective():
    from lora_booth.results import card

    base = {"model": "tiny", "instance_dir": "x", "instance_prompt": "a photo of sks dog",
            "class_prompt": "a photo of dog", "output_dir": "x"}
    assert card.objective_phrase(loading.resolve(base)[0]) == ""
    cfg, _ = loading.resolve({**base, "objective.loss": "huber", "objective.timesteps": "shifted"})
    assert card.objective_phrase(cfg) == "huber loss, c = 0.1 (snr schedule), shifted timesteps (shift 3)"
