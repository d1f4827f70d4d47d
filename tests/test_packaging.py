"""What a non-editable install (wheel/sdist) contains: every shipped folder must be a package."""

import configparser
import os

from setuptools import find_namespace_packages, find_packages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    return parser


def test_every_shipped_folder_is_a_found_package():
    # A folder of .py files left out of `packages` is missing from the wheel, and `import recbole_llm` then fails
    # outside an editable install (found by review). A folder of package data (properties/model/*.yaml) left
    # out makes setuptools warn at every install ("Package 'recbole_llm.properties.model' is absent from the
    # `packages` configuration"), hence find_namespace:, which finds folders without __init__.py too.
    cfg = _setup_cfg()
    finder = {"find:": find_packages, "find_namespace:": find_namespace_packages}[cfg["options"]["packages"].strip()]
    include = cfg["options.packages.find"]["include"].split()
    found = set(finder(where=REPO, include=include))
    folders = set()
    for folder, dirs, files in os.walk(os.path.join(REPO, "recbole_llm")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if any(name.endswith((".py", ".yaml")) for name in files):
            folders.add(os.path.relpath(folder, REPO).replace(os.sep, "."))
    assert "recbole_llm.properties.model" in folders
    assert folders <= found, f"not packages: {sorted(folders - found)}"


def test_torch_requirement_has_safe_loading():
    # torch.serialization.add_safe_globals arrived in 2.4 and torch.load defaults to weights_only=True from
    # 2.6; RecBole's own evaluate(load_best_model=True) relies on that default (found by review).
    from packaging.requirements import Requirement

    reqs = [Requirement(line) for line in _setup_cfg()["options"]["install_requires"].split("\n") if line.strip()]
    torch_spec = next(r.specifier for r in reqs if r.name == "torch")
    assert not torch_spec.contains("2.5.1") and torch_spec.contains("2.6.0")
