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
