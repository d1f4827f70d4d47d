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
    # outside an editable install (found by review). A folder holding only package data would make setuptools warn
    # at every install ("... is absent from the `packages` configuration"): each method's YAMLs sit in its package.
    cfg = _setup_cfg()
    finder = {"find:": find_packages, "find_namespace:": find_namespace_packages}[cfg["options"]["packages"].strip()]
    include = cfg["options.packages.find"]["include"].split()
    found = set(finder(where=REPO, include=include))
    folders = set()
    for folder, dirs, files in os.walk(os.path.join(REPO, "recbole_llm")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if any(name.endswith((".py", ".yaml")) for name in files):
            folders.add(os.path.relpath(folder, REPO).replace(os.sep, "."))
    assert {"recbole_llm.core", "recbole_llm.laser", "recbole_llm.seralm.alignment", "recbole_llm.paup"} <= folders
    assert folders <= found, f"not packages: {sorted(folders - found)}"


def test_torch_requirement_has_safe_loading():
    # torch.serialization.add_safe_globals arrived in 2.4 and torch.load defaults to weights_only=True from
    # 2.6; RecBole's own evaluate(load_best_model=True) relies on that default (found by review).
    from packaging.requirements import Requirement

    reqs = [Requirement(line) for line in _setup_cfg()["options"]["install_requires"].split("\n") if line.strip()]
    torch_spec = next(r.specifier for r in reqs if r.name == "torch")
    assert not torch_spec.contains("2.5.1") and torch_spec.contains("2.6.0")


def _build_wheel(tmp_path):
    """The wheel `pip install .` would install, built offline from a copy of the sources (no build/ in the repo)."""
    import shutil
    import subprocess
    import sys

    src = tmp_path / "src"
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        os.makedirs(src, exist_ok=True)
        shutil.copy(os.path.join(REPO, name), src / name)
    for name in ("recbole_llm", "properties", "dataset"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("*.whl")
    return wheel


def test_the_wheel_carries_the_yamls_and_the_bundled_data_and_a_non_editable_install_finds_them(tmp_path,
                                                                                                monkeypatch):
    import zipfile

    from recbole_llm.core import locate

    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        data = "recbole_llm-0.1.0.data/data/share/recbole_llm/"
        for path in ("properties/dataset/amazon-scientific.yaml", "properties/dataset/ml-100k.yaml",
                     "properties/model/Laser-cpu.yaml", "properties/model/Laser-cpu-long.yaml",
                     "properties/hyper/laser.hyper", "dataset/amazon-scientific/amazon-scientific.inter",
                     "dataset/amazon-scientific/amazon-scientific.item"):
            assert data + path in names, path
        for path in ("recbole_llm/laser/Laser.yaml", "recbole_llm/seralm/SeRALM.yaml", "recbole_llm/paup/PAUP.yaml",
                     "recbole_llm/seralm/SASRecSeRALM.yaml",
                     "recbole_llm/run/quick_start.py", "recbole_llm/llm/workers.py"):
            assert path in names, path
        # where pip puts <name>.data/data/ for an install: sys.prefix
        prefix = tmp_path / "prefix"
        for name in names:
            if name.startswith(data):
                archive.extract(name, tmp_path / "x")
        os.rename(tmp_path / "x" / "recbole_llm-0.1.0.data" / "data", prefix)
    # an install outside a checkout, run from an empty folder: only <prefix>/share/recbole_llm holds the files
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.delenv("RECBOLE_LLM_HOME", raising=False)
    monkeypatch.setattr(locate, "REPO_DIR", str(tmp_path / "no-checkout"))
    monkeypatch.setattr(locate, "SHARE_DIR", str(prefix / "share" / "recbole_llm"))
    files = locate.default_config_files("Laser", "amazon-scientific", "cpu-long")
    assert [os.path.relpath(f, prefix / "share" / "recbole_llm") for f in files] == [
        os.path.join("properties", "dataset", "amazon-scientific.yaml"),
        os.path.join("properties", "model", "Laser-cpu.yaml"), os.path.join("properties", "model", "Laser-cpu-long.yaml")]
    config = {"dataset": "amazon-scientific", "data_path": os.path.join("dataset", "amazon-scientific")}
    locate.check_dataset_available(config)
    assert config["data_path"] == str(prefix / "share" / "recbole_llm" / "dataset" / "amazon-scientific")
