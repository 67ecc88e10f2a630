"""tools/gpu_check.py (issue #20) runs whole on the CPU with the tiny models (--dry-run), so the
prepared GPU check cannot rot while no GPU is there: every preset and precision case trains
through recipe.run with finite losses or says why it was skipped, and nothing a GPU must measure
is filled in with a number."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402

NO_CUDA = "skipped: no CUDA"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the whole module (≈ 50 s): 1 warm-up + 1 timed step a case, one plan."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--steps", "1,1", "--plan-cases", "8gb"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    return report, {case["name"]: case for case in report["cases"]}, (out / "gpu_check.md").read_text()


def test_every_preset_and_precision_case_trains_or_says_why_not(dry_run):
    report, cases, _ = dry_run
    assert list(cases) == [case.name for case in gpu_check.all_cases()]
    for name in gpu_check.SD15_PRESETS + gpu_check.SDXL_PRESETS + gpu_check.FLUX_PRESETS + gpu_check.ZIMAGE_PRESETS + \
            gpu_check.QWEN_IMAGE_PRESETS:
        assert cases[name]["status"] == "ok", cases[name]
    for case in cases.values():
        if case["status"] == "skipped":
            assert case["reason"].strip(), case
            continue
        assert case["status"] == "ok", case
        if case["runner"] == "reference":
            assert case["s_per_step"] > 0
            continue
        values = [step[key] for step in case["steps"] for key in ("loss", "instance", "prior")]
        assert case["losses_finite"] is True and len(case["steps"]) >= 2 and all(map(math.isfinite, values))
        assert case["s_per_step"] > 0
    assert cases["8gb train.attention=xformers"]["reason"].startswith("xformers: skipped: no CUDA")


def test_gpu_only_measurements_say_skipped_instead_of_a_number(dry_run):
    report, cases, table = dry_run
    trained = [case for case in cases.values() if case.get("runner") == "lora-booth" and case["status"] == "ok"]
    assert trained
    for case in trained:
        assert case["peak_allocated"] == case["peak_reserved"] == NO_CUDA
        assert case.get("allocated_vs_plan", NO_CUDA) == NO_CUDA and "device_bytes" not in case
    assert report["meta"]["context_bytes"] == NO_CUDA
    assert cases["8gb"]["peak_fraction"] == NO_CUDA                  # TFLOP/s: measured; % of a card: not here
    assert isinstance(cases["8gb"]["tflops"], float) and cases["8gb"]["plan"]["tracked_peak"] > 0
    assert cases["6gb"]["plan"] == {"skipped": "skipped: not in --plan-cases"}
    row = next(line for line in table.splitlines() if line.startswith("| 8gb |"))
    assert row.count(NO_CUDA) >= 4, row
    for name in cases:
        assert f"| {name} |" in table


def test_the_fp16_path_runs_with_a_loss_scaler_on_the_cpu(dry_run):
    """fp16 presets train through accelerate's scaler (a CPU GradScaler in the dry run); the
    injected inf gradient is skipped, changes nothing and halves the scale; the final checkpoint
    holds the scaler's state."""
    _, cases, _ = dry_run
    check = cases["8gb fp16 overflow"]["overflow_check"]
    assert check["ok"] and check["skipped"] and check["adapters_unchanged"]
    assert check["scale_after"] == check["scale_before"] / 2
    assert cases["8gb fp16 overflow"]["skipped_updates"] == 1
    assert cases["8gb fp16 overflow"]["checkpoint_scaler"]["scale"] == check["scale_after"]
    for name in ("24gb", "sdxl-8gb"):
        assert cases[name]["mixed_precision"] == "fp16" and cases[name]["checkpoint_scaler"]["scale"] > 0
    assert cases["24gb train.mixed_precision=bf16"]["checkpoint_scaler"] is None


def test_class_images_are_drawn_in_half_precision_and_sdxl_decodes_in_fp32(dry_run):
    _, cases, _ = dry_run
    for name, family_decode in (("24gb", True), ("sdxl-24gb", False)):  # the first case of each family
        info = cases[name]["class_images"]
        assert info["images"] == gpu_check.CLASS_IMAGES and info["compute_dtype"] == "torch.float16"
        decodes = [d for batch in cases[name]["decodes"] for d in batch["decodes"]]
        assert decodes and all(d["finite"] and d["vae_weights"] == "torch.float32" for d in decodes)
        assert all(d["autocast"] is family_decode for d in decodes)   # SDXL: outside autocast
        assert sum(batch["black"] for batch in cases[name]["decodes"]) == 0


def test_flux_presets_train_in_bf16_on_fp8_weights_with_the_prior_by_prediction(dry_run):
    """tiny-flux built from its configs like the full-size FLUX.1-dev: no class images drawn, and
    the class target is the frozen transformer's own prediction, which the adapters (zero at the
    start) reproduce, so the first prior loss is 0."""
    _, cases, _ = dry_run
    for name in gpu_check.FLUX_PRESETS:
        case = cases[name]
        assert case["family"] == "flux" and case["mixed_precision"] == "bf16" and case["fp8_base"] is True
        assert "class_images" not in case and "decodes" not in case
        assert abs(case["steps"][0]["prior"]) < 1e-6 and case["losses_finite"] is True


def test_the_full_size_flux_pipeline_is_made_in_bf16_without_touching_the_cpu(tmp_path):
    """What the GPU run builds for the FLUX.1 presets, here on the meta device: FLUX.1-dev's 11.9 B
    transformer and 4.76 B T5 made in bf16 where they are (never fp32 on the CPU first), the VAE in
    fp32, the flow-matching scheduler, and tokenizers of the real lengths (CLIP 77, T5 512)."""
    import torch

    pipe = gpu_check.random_pipeline(ROOT / "lora_booth" / "configs" / "flux-dev", "meta", torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32
    sizes = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
             for name in ("transformer", "text_encoder_2", "text_encoder", "vae")}
    assert round(sizes["transformer"] / 1e9, 1) == 11.9 and round(sizes["text_encoder_2"] / 1e9, 2) == 4.76
    for name, dtype in (("transformer", torch.bfloat16), ("text_encoder_2", torch.bfloat16),
                        ("text_encoder", torch.bfloat16), ("vae", torch.float32)):
        assert {(p.device.type, p.dtype) for p in getattr(pipe, name).parameters()} == {("meta", dtype)}, name
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert (pipe.tokenizer.model_max_length, pipe.tokenizer_2.model_max_length) == (77, 512)
    assert pipe.tokenizer_2(["a photo of sks dog"], padding="max_length", max_length=512).input_ids[0][-1] == 0
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id   # CLIP pools at this id
    assert not gpu_check.has_weights(ROOT / "lora_booth" / "configs" / "flux-dev")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert gpu_check.has_weights(tmp_path)


def test_steady_seconds_per_step_leave_out_the_warm_up():
    assert gpu_check.steady([5.0, 6.0, 6.5, 7.0], warmup=1) == pytest.approx(2.0 / 3)
    assert gpu_check.steady([5.0], warmup=1) is None
    names = [case.name for case in gpu_check.select(gpu_check.all_cases(), "sdxl-*,8gb")]
    assert "8gb" in names and all(n.startswith("sdxl-") or n == "8gb" for n in names)


def test_the_gpu_side_of_the_table_from_recorded_numbers(tmp_path):
    """The arithmetic only a GPU run reaches (memory against the plan, the preset's name − 10 %,
    % of the card's peak) runs here on numbers such a run records."""
    ctx = gpu_check.Context(False, tmp_path, tmp_path, tmp_path, warmup=2, timed=3, device="cuda",
                            capabilities={"gpu_name": "NVIDIA H200", "driver": "580", "bitsandbytes": "ok",
                                          "xformers": "not importable"}, context_bytes=600 * 2**20)
    probe = gpu_check.Probe(ctx, gpu_check.all_cases()[3])          # 8gb
    GiB = 2**30
    probe.steps = [{"end": t, "loss": 0.1, "instance": 0.05, "prior": 0.05, "skipped": False,
                    "peak_allocated": int(3.9 * GiB), "peak_reserved": int(4.4 * GiB)}
                   for t in (1.0, 1.2, 1.4, 1.6, 1.8)]
    result = {"name": "8gb", "group": "preset", "family": "sd15", "status": "ok", "mixed_precision": "fp16",
              "context_bytes": 700 * 2**20, **gpu_check.measurements(probe, ctx, start_allocated=0)}
    result["plan"] = {"tracked_peak": int(3.6 * GiB), "total": int(4.46 * GiB), "flops": 1.78e12}
    result.update(gpu_check.against_plan(result, ctx))
    assert result["s_per_step"] == pytest.approx(0.2)
    assert result["allocated_vs_plan"] == pytest.approx(3.9 / 3.6)
    assert result["device_bytes"] == int(4.4 * GiB) + 700 * 2**20 and result["fits_name_minus_10pct"] is True
    assert result["tflops"] == pytest.approx(8.9) and result["peak_fraction"] == pytest.approx(8.9e12 / 989e12)
    report = {"meta": {"dry_run": False, "cuda": True, "warmup": 2, "timed": 3, "budget_s": 360, "elapsed_s": 10,
                       "context_bytes": ctx.context_bytes, "capabilities": ctx.capabilities,
                       "versions": gpu_check.versions()}, "cases": [result]}
    row = next(line for line in gpu_check.table(report).splitlines() if line.startswith("| 8gb |"))
    assert "| 3.90 | 3.60 | 1.08 |" in row and "| yes |" in row and "1%" in row and NO_CUDA not in row
