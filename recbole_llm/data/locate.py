"""Where datasets and the YAMLs that go with them are found, and a clear error when they are not."""

import os

from recbole_llm.errors import DataNotFoundError

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(PACKAGE_DIR)

# Datasets whose raw files must be fetched on a machine with internet (see recbole_llm.data.amazon2018).
FETCHABLE = {
    "amazon-pet": "Pet_Supplies",
    "amazon-arts": "Arts_Crafts_and_Sewing",
}


def _first_existing(*paths):
    for path in paths:
        if path and os.path.isfile(path):
            return path
    return None


def dataset_yaml(dataset):
    """``properties/dataset/<dataset>.yaml`` from the working directory or the source checkout."""
    name = f"{dataset}.yaml"
    return _first_existing(os.path.join("properties", "dataset", name),
                           os.path.join(REPO_DIR, "properties", "dataset", name))


def profile_yaml(model, profile):
    """``properties/model/<Model>-<profile>.yaml`` when that profile exists for the model."""
    name = f"{model}-{profile}.yaml"
    return _first_existing(os.path.join("properties", "model", name),
                           os.path.join(REPO_DIR, "properties", "model", name))


PROFILES = ("auto", "cpu", "cpu-long", "paper", "none")


def profile_chain(profile):
    """The profile YAML names a profile loads, in order: ``cpu-long`` is ``cpu`` then the ``cpu-long`` differences."""
    parts = profile.split("-")
    return ["-".join(parts[:i]) for i in range(1, len(parts) + 1)]


def resolve_profile(profile):
    if profile == "auto":
        import torch

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
        f"    python -m recbole_llm.data.amazon2018 fetch --category={category} --name={dataset} --out=dataset\n"
        f"which downloads the Amazon 2018 '{category}' 5-core reviews and metadata and writes "
        f"dataset/{dataset}/{dataset}.inter and .item; or, with the two raw files already downloaded,\n"
        f"    python -m recbole_llm.data.amazon2018 convert --reviews=<{category}_5.json.gz> "
        f"--meta=<meta_{category}.json.gz> --name={dataset} --out=dataset"
    )


def check_dataset_available(config):
    """Point ``data_path`` at the bundled copy when needed; raise a clear error when the data is missing."""
    dataset = config["dataset"]
    inter = os.path.join(config["data_path"], f"{dataset}.inter")
    if os.path.isfile(inter):
        return
    bundled = os.path.join(REPO_DIR, "dataset", dataset)
    if os.path.isfile(os.path.join(bundled, f"{dataset}.inter")):
        config["data_path"] = bundled
        return
    if dataset in FETCHABLE:
        raise DataNotFoundError(fetch_instructions(dataset))
    import yaml

    url_yaml = os.path.join(os.path.dirname(__import__("recbole").__file__), "properties", "dataset", "url.yaml")
    with open(url_yaml) as f:
        known = yaml.safe_load(f)
    if dataset not in known:  # RecBole downloads the names it knows; anything else is a typo or missing
        raise DataNotFoundError(
            f"Dataset '{dataset}' not found: expected atomic files at '{inter}' (and '{dataset}.item' beside it "
            f"for text-based models). Set data_path, or see README 'Adding a dataset'."
        )
