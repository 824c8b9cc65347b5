"""Packaging details pyproject.toml cannot express: the top-level ``configs/`` and
``checkpoints/`` folders of the checkout ship inside the wheel as package data
(``mdeq/configs/<task>/<model>.yaml`` and ``zoo/checkpoints/``), so an installed mdeq, also with
``pip install --target`` or ``--user``, finds them next to its code. Everything else is in
pyproject.toml."""

from setuptools import find_packages, setup

DATA_FOLDERS = {"mdeq.configs": "configs", "zoo.checkpoints": "checkpoints"}

setup(
    packages=find_packages(include=["mdeq", "mdeq.*", "zoo", "zoo.*"]) + list(DATA_FOLDERS),
    package_dir=DATA_FOLDERS,
    package_data={"mdeq.configs": ["*/*.yaml"], "zoo.checkpoints": ["*.safetensors", "*.json"]},
    include_package_data=False,
)
