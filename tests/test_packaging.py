"""What a non-editable install (wheel/sdist) contains: every source folder must be a package."""

import os

from setuptools import find_packages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_source_folder_is_a_found_package():
    # setup.cfg: packages = find: (include recbole_llm*). A folder of .py files without __init__.py is left
    # out of the wheel, and `import recbole_llm` then fails outside an editable install (found by review).
    found = set(find_packages(where=REPO, include=["recbole_llm*"]))
    folders = set()
    for folder, dirs, files in os.walk(os.path.join(REPO, "recbole_llm")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if any(name.endswith(".py") for name in files):
            folders.add(os.path.relpath(folder, REPO).replace(os.sep, "."))
    assert folders and folders <= found, f"not packages: {sorted(folders - found)}"


def test_torch_requirement_has_safe_loading():
    # torch.serialization.add_safe_globals arrived in 2.4 and torch.load defaults to weights_only=True from
    # 2.6; RecBole's own evaluate(load_best_model=True) relies on that default (found by review).
    import configparser

    from packaging.requirements import Requirement

    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    reqs = [Requirement(line) for line in parser["options"]["install_requires"].split("\n") if line.strip()]
    torch_spec = next(r.specifier for r in reqs if r.name == "torch")
    assert not torch_spec.contains("2.5.1") and torch_spec.contains("2.6.0")
