"""The planner prices launch.sharding=fsdp: the frozen denoiser divided by the processes, plus the
blocks gathered whole; and the advice offers it to a run of several processes that does not fit."""
from lora_booth.config import loading
from lora_booth.planning import plan, savers


BASE = [("model", "tiny"), ("instance_dir", "x"), ("instance_prompt", "a photo of sks dog"),
        ("class_prompt", "a photo of dog"), ("output_dir", "x"), ("data.resolution", "32")]


def planned(*pairs):
    cfg, _ = loading.resolve(BASE + [("sample.num", "0"), *pairs])
    return plan.estimate(cfg, flops=False)


def test_sharding_divides_the_frozen_denoiser_and_the_advice_offers_it():
    whole = planned(("launch.processes", "4"))
    sharded = planned(("launch.processes", "4"), ("launch.sharding", "fsdp"))
    frozen = whole.parts["unet weights (frozen)"]
    assert sharded.parts["unet weights (frozen), 1/4 per GPU"] == -(-frozen // 4)
    gathered = sharded.parts["+ 2 largest blocks gathered whole"]
    assert 0 < gathered < frozen
    # the rest of the step is the same trace: the peak drops by exactly what sharding saves
    assert whole.tracked_peak - sharded.tracked_peak == frozen - -(-frozen // 4) - gathered
    # a run of 4 processes that fits only sharded is told so first (no quality cost)
    pairs = BASE + [("launch.processes", "4")]
    advice = savers.combination(pairs, sharded.total, report=lambda *_: None)
    assert advice[0][:2] == ("launch.sharding", "fsdp") and "4 processes" in advice[0][2]


def test_sharding_is_not_offered_to_one_process():
    assert savers.sharding_first(BASE) == []
    assert savers.sharding_first(BASE + [("launch.processes", "2"), ("launch.sharding", "fsdp")]) == []
