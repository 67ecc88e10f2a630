import pytest
import torch
from diffusers import DDPMScheduler

from lora_booth import objective


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
    assert torch.equal(objective.denoising_target(scheduler(), latents, noise, timesteps), noise)
    v_scheduler = scheduler("v_prediction")
    v = objective.denoising_target(v_scheduler, latents, noise, timesteps)
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
    a = objective.sample_noise(latents, 1000, generators())
    b = objective.sample_noise(latents, 1000, generators())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    single = objective.sample_noise(latents[1:], 1000, generators()[1:])  # a row's draw ignores its batch
    assert torch.equal(single[0][0], a[0][1]) and single[1][0] == a[1][1]
    offset, _ = objective.sample_noise(latents, 1000, generators(), noise_offset=10.0)
    assert offset.mean(dim=(2, 3)).abs().mean() > 1.0  # per-channel constant added
