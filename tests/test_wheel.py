"""lora-booth as a user installs a release: the wheel built from this checkout, installed (not
editable) into a fresh virtual environment, holds every module and data file of the package and
runs the demo from a folder outside the checkout.

The fresh environment has no lora-booth but the wheel's; its dependencies (torch and the rest of
the tested set) are the ones this test runs with, made visible by a path file rather than
downloaded again, so the test runs offline in about half a minute."""
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "README.md", "lora_booth", "presets")  # what an sdist holds


def run(command: list, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if not (ROOT / name).exists():
            continue
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", root / "dist", source], cwd=root)
    return next((root / "dist").glob("lora_booth-*.whl"))


def test_the_wheel_holds_every_module_and_data_file(wheel):
    """Every file of the package in the checkout (Python or data, in any subfolder) and every preset."""
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "lora_booth"
    expected = {f"lora_booth/{p.relative_to(package).as_posix()}" for p in package.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    expected |= {f"lora_booth/presets/{p.name}" for p in (ROOT / "presets").glob("*.yaml")}
    assert "lora_booth/families/flux.py" in expected
    assert sorted(expected - names) == []


def test_the_installed_wheel_runs_the_demo_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "env"
    run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=tmp_path)
    python = env_dir / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path).stdout.strip())
    # the dependencies this test runs with; a path file adds the folder without processing the path
    # files in it, so the checkout's editable install stays out of the fresh environment
    (site / "tested_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        cwd=tmp_path)
    where = run([python, "-c", "import lora_booth, lora_booth.families.flux; print(lora_booth.__file__)"],
                cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not the checkout
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "LORA_BOOTH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = run([env_dir / "bin" / "lora-booth", "train", "preset=demo", "output_dir=out", "max_steps=3",
                "sample.num=1", "train.log_every=1"], cwd=work, env=env, timeout=600)
    assert (work / "out" / "pytorch_lora_weights.safetensors").is_file(), done.stdout[-2000:]
    assert "trained 3 steps" in done.stdout
