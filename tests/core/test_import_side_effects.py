"""Importing the plugin must not leave process-wide switches changed by RecBole's imports."""

import subprocess
import sys


def test_import_leaves_torch_anomaly_detection_off():
    # recbole 1.2.1's sine.py turns anomaly detection on at import (slow backward passes for every model)
    code = "import recbole_llm, torch; print(torch.is_anomaly_enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_anomaly_detection_asked_for_before_import_is_kept():
    code = ("import torch; torch.autograd.set_detect_anomaly(True); import recbole_llm; "
            "print(torch.is_anomaly_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "True"
