"""Packages: `latentflow` and its subpackages, plus the repository's `pipelines/` folder installed as
`latentflow.pipelines` (a top-level `pipelines` package would collide with other projects' folders of that name).
Everything else is in setup.cfg."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["latentflow", "latentflow.*"]), "latentflow.pipelines"],
    package_dir={"latentflow.pipelines": "pipelines"},
)
