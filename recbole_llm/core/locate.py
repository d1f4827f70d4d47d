"""Where datasets and the YAMLs that go with them are found, and a clear error when they are not.

The search path for ``properties/`` (dataset YAMLs, CPU profiles, hyperparameter files) and the bundled
``dataset/``, first match wins: the working directory; ``$RECBOLE_LLM_HOME``; the source checkout the package runs
from (an editable install); ``<prefix>/share/recbole_llm``, where a wheel or ``pip install .`` puts them
(setup.cfg ``data_files``), so a non-editable install finds them from any directory.
"""

import os
import sys

import torch
import yaml

from recbole_llm.core.errors import DataNotFoundError

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(PACKAGE_DIR)
SHARE_DIR = os.path.join(sys.prefix, "share", "recbole_llm")


def resource_roots():
    """The folders after the working directory that may hold ``properties/`` and ``dataset/``, in search order."""
    roots = [os.environ.get("RECBOLE_LLM_HOME"), REPO_DIR, SHARE_DIR]
    return [root for root in dict.fromkeys(roots) if root and os.path.isdir(root)]


def find_resource(*parts):
    """The first file ``<root>/<parts>`` on the search path (the working directory first), or None."""
    for root in (os.curdir, *resource_roots()):
        path = os.path.join(root, *parts)
        if os.path.isfile(path):
            return path
    return None

# Datasets whose raw files must be fetched on a machine with internet (see recbole_llm.datasets.amazon2018).
FETCHABLE = {
    "amazon-pet": "Pet_Supplies",
    "amazon-arts": "Arts_Crafts_and_Sewing",
}


def dataset_yaml(dataset):
    """``properties/dataset/<dataset>.yaml`` from the search path (see the module docstring)."""
    return find_resource("properties", "dataset", f"{dataset}.yaml")


def profile_yaml(model, profile):
    """``properties/model/<Model>-<profile>.yaml`` when that profile exists for the model."""
    return find_resource("properties", "model", f"{model}-{profile}.yaml")


def bundled_dataset_dir(dataset):
    """The folder of a dataset shipped with the package (``dataset/<name>/<name>.inter``), or None."""
    for root in resource_roots():
        folder = os.path.join(root, "dataset", dataset)
        if os.path.isfile(os.path.join(folder, f"{dataset}.inter")):
            return folder
    return None


PROFILES = ("auto", "cpu", "cpu-long", "paper", "none")


def profile_chain(profile):
    """The profile YAML names a profile loads, in order: ``cpu-long`` is ``cpu`` then the ``cpu-long`` differences."""
    parts = profile.split("-")
    return ["-".join(parts[:i]) for i in range(1, len(parts) + 1)]


def resolve_profile(profile):
    if profile == "auto":
        return "paper" if torch.cuda.is_available() else "cpu"
    return profile


def default_config_files(model, dataset, profile="none"):
    """YAMLs the CLI puts before the user's: the dataset's settings, then the model's size profile."""
    files = []
    if dataset:
        path = dataset_yaml(dataset)
        if path:
            files.append(path)
    profile = resolve_profile(profile)
    if model and profile not in ("none", "paper"):
        for name in profile_chain(profile):
            path = profile_yaml(model, name)
            if path:
                files.append(path)
    return files


def fetch_instructions(dataset):
    category = FETCHABLE[dataset]
    return (
        f"Dataset '{dataset}' is not on this machine. On a machine with internet, run\n"
        f"    python -m recbole_llm.datasets.amazon2018 fetch --category={category} --name={dataset} --out=dataset\n"
        f"which downloads the Amazon 2018 '{category}' 5-core reviews and metadata and writes "
        f"dataset/{dataset}/{dataset}.inter and .item; or, with the two raw files already downloaded,\n"
        f"    python -m recbole_llm.datasets.amazon2018 convert --reviews=<{category}_5.json.gz> "
        f"--meta=<meta_{category}.json.gz> --name={dataset} --out=dataset"
    )


def check_dataset_available(config):
    """Point ``data_path`` at the bundled copy when needed; raise a clear error when the data is missing."""
    dataset = config["dataset"]
    inter = os.path.join(config["data_path"], f"{dataset}.inter")
    if os.path.isfile(inter):
        return
    bundled = bundled_dataset_dir(dataset)
    if bundled:
        config["data_path"] = bundled
        return
    if dataset in FETCHABLE:
        raise DataNotFoundError(fetch_instructions(dataset))
    url_yaml = os.path.join(os.path.dirname(__import__("recbole").__file__), "properties", "dataset", "url.yaml")
    with open(url_yaml) as f:
        known = yaml.safe_load(f)
    if dataset not in known:  # RecBole downloads the names it knows; anything else is a typo or missing
        raise DataNotFoundError(
            f"Dataset '{dataset}' not found: expected atomic files at '{inter}' (and '{dataset}.item' beside it "
            f"for text-based models). Set data_path, or see README 'Adding a dataset'."
        )
