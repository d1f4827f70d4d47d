"""Issue 5: a stock RecBole script (run_recbole, load_data_and_model) runs plugin models after import."""

import pytest
import torch

import recbole_llm  # noqa: F401  (registration)
from tests.helpers_seralm import tiny_config_dict


def _stock_run(model, config_dict, dataset="seralm-tiny"):
    from recbole.quick_start import run_recbole

    return run_recbole(model=model, dataset=dataset, config_dict=config_dict)


def _reload_and_test(model_file):
    from recbole.quick_start import load_data_and_model
    from recbole.utils import get_trainer

    config, model, _, _, _, test_data = load_data_and_model(model_file)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    return trainer.evaluate(test_data, load_best_model=False)


def _saved_file(tmp_path, model):
    files = sorted((tmp_path / "saved").glob(f"{model}-*.pth"))
    assert len(files) == 1, files
    return str(files[0])


def test_stock_run_recbole_trains_sasrecseralm_and_reloads_it(tmp_path):
    cfg = tiny_config_dict(tmp_path, knowledge_source="item_text")
    result = _stock_run("SASRecSeRALM", cfg)
    model_file = _saved_file(tmp_path, "SASRecSeRALM")
    checkpoint = torch.load(model_file, weights_only=True)  # the plugin's trainer wrote a safe file
    assert "knowledge_proj_size" in checkpoint["config"].final_config_dict  # plugin defaults were applied
    reloaded = _reload_and_test(model_file)
    assert reloaded["ndcg@5"] == pytest.approx(result["test_result"]["ndcg@5"], abs=1e-6)


def test_stock_run_recbole_trains_laser_and_reloads_it(tmp_path):
    from tests.helpers_laser import tiny_config_dict as tiny_laser_config
    from tests.helpers_laser import write_tiny_dataset

    write_tiny_dataset(tmp_path)
    result = _stock_run("Laser", tiny_laser_config(tmp_path), dataset="tiny-laser")
    reloaded = _reload_and_test(_saved_file(tmp_path, "Laser"))
    assert reloaded["ndcg@10"] == pytest.approx(result["test_result"]["ndcg@10"], abs=1e-6)
