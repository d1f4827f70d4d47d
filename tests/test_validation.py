"""Unknown keys and out-of-range values of plugin models are refused with a message naming the key."""

import os
import subprocess
import sys

import pytest

from recbole_llm.config import Config
from recbole_llm.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("model,key,value,expected", [
    ("Laser", "n_experts", 0, "integer >= 1"),
    ("Laser", "n_query_tokens", 0, "integer >= 1"),
    ("Laser", "temperature", 0.0, "> 0"),
    ("Laser", "lb_weight", -0.1, ">= 0"),
    ("SASRecSeRALM", "alpha", -1.0, ">= 0"),
    ("SASRecSeRALM", "refresh_every", 0, "integer >= 1"),
])
def test_out_of_range_values_are_refused(model, key, value, expected):
    with pytest.raises(ConfigError, match=f"'{key}'.*{expected}"):
        Config(model, "ml-100k", config_dict={key: value}, cmd_args=[])


def test_unknown_key_of_a_plugin_model_suggests_the_right_one():
    with pytest.raises(ConfigError, match="'temperatur'.*did you mean 'temperature'"):
        Config("Laser", "ml-100k", config_dict={"temperatur": 0.1}, cmd_args=[])
    config = Config("Laser", "ml-100k", config_dict={"temperatur": 0.1, "allow_unknown_keys": True}, cmd_args=[])
    assert config["temperatur"] == 0.1


def test_recbole_models_keep_recboles_leniency():
    config = Config("SASRec", "ml-100k", config_dict={"my_custom_key": 1}, cmd_args=[])
    assert config["my_custom_key"] == 1


def test_cli_reports_a_bad_value_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run_recbole_llm.py"), "--model=Laser",
                           "--dataset=ml-100k", "--n_experts=0"], cwd=str(tmp_path), capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert proc.returncode != 0
    assert "n_experts" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "saved")
