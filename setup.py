"""Packages of the llmfeat distribution (everything else is in pyproject.toml).

The Feast feature repository feast_repo/ stays at the top of the checkout (the feast CLI runs
inside it, and it is the one copy of the definitions); the wheel carries it as the data package
llm_features/feast_repo/ (files: [tool.setuptools.package-data] in pyproject.toml), where
llm_features.feature_repo finds it. pyproject.toml's package discovery has no such mapping, hence
this file.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["llm_features*", "ranker*"]), "llm_features.feast_repo"],
    package_dir={"llm_features.feast_repo": "feast_repo"},
)
