"""The report's toy-world scores over training: read off the run's own grids by the detector."""
import numpy as np
import yaml
from PIL import Image

from lora_booth.config import loading
from lora_booth.results import report, sample
from lora_booth.results import report_sections
from lora_booth.results import run_record
from lora_booth.toyworld import subject, world


def write_grid(path, cfg, prompts, rows):
    sheet = sample.grid([[Image.fromarray(image) for image in row] for row in rows])
    settings = sample.grid_settings(cfg, prompts)
    sample.save_png(sheet, path, sample.grid_info(cfg, prompts, settings, step=path.stem))


def drawn(shape: str, seed: int) -> np.ndarray:
    """A toy-world picture of `shape`: the first scene of that shape the seed's stream draws."""
    rng = np.random.default_rng(seed)
    while True:
        scene = world.sample_scene(rng)
        if scene.shape == shape:
            return world.render(scene)


def star(seed: int) -> np.ndarray:
    return drawn("star", seed)


def circle(seed: int) -> np.ndarray:
    return drawn("circle", seed)


def test_scores_per_grid_from_the_detector(tmp_path):
    cfg, _ = loading.resolve({"preset": "demo", "output_dir": str(tmp_path), "sample.num": "4"})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    prompts = sample.default_prompts(cfg)
    (tmp_path / "samples").mkdir()
    subjects = subject.generate_subject(4, seed=3)
    base_rows = [[star(i) for i in range(4)], [star(10 + i) for i in range(4)], [star(20 + i) for i in range(4)]]
    # after training: the trigger row is the subject 4 of 4 times; the class row kept its shape
    # twice, turned into circles once and into the subject once (drift)
    late_rows = [list(subjects), [star(30), star(31), circle(32), subjects[0]], list(subjects)]
    write_grid(tmp_path / "samples" / "base.png", cfg, prompts, base_rows)
    write_grid(tmp_path / "samples" / "step-00000400.png", cfg, prompts, late_rows)
    points = report_sections.toy_points(run_record.read_run(tmp_path))
    assert [p.step for p in points] == [0, 400]
    assert points[0].subject == 0 and points[0].drift == 0
    assert points[1].subject == 1.0
    assert points[1].class_shape == 0.5 and points[1].drift == 0.25
    html = report.build_html(tmp_path)
    assert "Toy-world scores over training" in html and "id='toy-scores'" in html


def test_no_toy_scores_for_other_bases(tmp_path):
    cfg, _ = loading.resolve({"model": "tiny", "instance_dir": "x", "instance_prompt": "a photo of sks dog",
                             "class_prompt": "a photo of dog", "output_dir": str(tmp_path)})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert report_sections.toy_points(run_record.read_run(tmp_path)) == []
