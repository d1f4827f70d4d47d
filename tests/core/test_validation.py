"""Unknown keys and out-of-range values of plugin models are refused with a message naming the key."""

import os
import subprocess
import sys

import pytest

from recbole_llm.core.config import Config
from recbole_llm.core.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_each_model_class_declares_its_switches_and_a_variant_inherits_its_bases():
    from recbole_llm.core.validation import declared
    from recbole_llm.paup.model import PAUP
    from recbole_llm.seralm.model import PAUPSeRALM, SASRecSeRALM

    choices = declared(PAUPSeRALM, "CHOICES")
    assert choices["pos_score_scaling"] == PAUP.CHOICES["pos_score_scaling"]  # from PAUP
    assert "knowledge_concat" in choices and "generator_mode" in choices  # from the SeRALM mixin
    assert "pos_score_scaling" not in declared(SASRecSeRALM, "CHOICES")
    assert "seg_num" in declared(PAUPSeRALM, "RANGES")
    with pytest.raises(ConfigError, match="'pos_score_scaling' = 'double' is not one of"):
        Config("PAUPSeRALM", "ml-100k", config_dict={"pos_score_scaling": "double"}, cmd_args=[])


def test_the_checks_import_no_model():
    """validation reads what each model class declares: it imports no model or trainer module (at the top or in a
    function), so none of them is imported back by the checks they call."""
    import ast

    for name in ("validation.py", "keys.py"):
        with open(os.path.join(REPO, "recbole_llm", "core", name)) as f:
            tree = ast.parse(f.read())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        upward = sorted(m for m in imported if m.startswith(("recbole_llm.laser", "recbole_llm.seralm",
                                                              "recbole_llm.paup", "recbole_llm.core.config")))
        assert upward == [], f"{name} imports {upward}"


def _yaml_keys(path):
    import yaml

    with open(path) as f:
        return set(yaml.safe_load(f) or {})


def test_seralm_defaults_are_written_once():
    """The knowledge and alignment keys live in SeRALM.yaml only; each variant's YAML holds its base model's keys."""
    from recbole_llm.core.keys import plugin_model_yaml, plugin_model_yamls

    shared = _yaml_keys(plugin_model_yaml("SeRALM"))
    for name in ("CaserSeRALM", "SASRecSeRALM", "PAUPSeRALM", "LightSANsSeRALM"):
        assert not shared & _yaml_keys(plugin_model_yaml(name)), name
        assert plugin_model_yaml("SeRALM") in plugin_model_yamls(name)
        assert Config(name, "ml-100k", cmd_args=[])["knowledge_concat"] == "project"


def test_no_default_is_written_in_two_yamls_a_model_loads():
    """Each model's YAMLs (the shared ones, then its own) set disjoint keys, but for RecBole's loss_type and
    train_neg_sample_args, which a base model and SeRALM.yaml both pin to the same value."""
    from recbole_llm.core.keys import plugin_model_yamls
    from recbole_llm.core.registry import PLUGIN_MODELS

    for name in PLUGIN_MODELS:
        seen = {}
        for path in plugin_model_yamls(name):
            for key in _yaml_keys(path) - {"loss_type", "train_neg_sample_args"}:
                assert key not in seen, f"{name}: {key} in {seen.get(key)} and {path}"
                seen[key] = path
    config = Config("PAUPSeRALM", "ml-100k", cmd_args=[])  # PAUP's own keys come from PAUP.yaml
    assert config["seg_num"] == 4 and config["hidden_dropout_prob"] == 0.2 and config["llm_workers"] == 1
