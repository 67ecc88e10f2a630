"""Which packages the wheel holds; everything else about the project is in pyproject.toml."""
from setuptools import find_packages, setup

# every package under lora_booth, found rather than listed (a listed set silently missed one), and
# the presets folder at the top of the repository installed as lora_booth.presets
setup(packages=[*find_packages(include=["lora_booth", "lora_booth.*"]), "lora_booth.presets"],
      package_dir={"lora_booth.presets": "presets"})
