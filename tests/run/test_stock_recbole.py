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
    # RecBole's own Config starts from uniform negative sampling; as for its SASRec, a softmax model needs it off
    cfg = tiny_laser_config(tmp_path, train_neg_sample_args=None)
    result = _stock_run("Laser", cfg, dataset="tiny-laser")
    reloaded = _reload_and_test(_saved_file(tmp_path, "Laser"))
    assert reloaded["ndcg@10"] == pytest.approx(result["test_result"]["ndcg@10"], abs=1e-6)
    # RecBole's own Config knows nothing of the stages; the model set epochs to what the trainer ran (1 + 1)
    assert torch.load(_saved_file(tmp_path, "Laser"), weights_only=True)["config"]["epochs"] == 2


def test_stock_run_recbole_trains_paup_as_the_readme_shows(tmp_path):
    cfg = tiny_config_dict(tmp_path)
    for key in [k for k in cfg if k.startswith("knowledge") or k in ("llm_path", "encoder_path", "alignment")]:
        del cfg[key]
    result = _stock_run("PAUP", cfg)  # no loss_type: RecBole takes PAUP's declared input type, the YAML says CE
    reloaded = _reload_and_test(_saved_file(tmp_path, "PAUP"))
    assert reloaded["ndcg@5"] == pytest.approx(result["test_result"]["ndcg@5"], abs=1e-6)


@pytest.mark.parametrize("model", ["Laser", "SASRecSeRALM", "PAUP"])
def test_stock_default_negative_sampling_is_refused_not_trained_as_positives(tmp_path, model):
    """RecBole's default uniform sampling adds label-0 rows; a softmax model would read them as next items."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model

    from recbole_llm.core.errors import ConfigError

    cfg = tiny_config_dict(tmp_path)
    del cfg["train_neg_sample_args"]
    config = Config(model=model, dataset="seralm-tiny", config_dict=cfg)
    assert config["train_neg_sample_args"]["distribution"] == "uniform"  # what a stock run starts from
    train_data = data_preparation(config, create_dataset(config))[0]
    with pytest.raises(ConfigError, match="train_neg_sample_args must be None"):
        get_model(model)(config, train_data._dataset)


@pytest.mark.parametrize("model", ["Laser", "CaserSeRALM"])
def test_plugin_config_refuses_negative_sampling_for_softmax_models(tmp_path, model):
    from recbole_llm.core.config import Config
    from recbole_llm.core.errors import ConfigError

    cfg = tiny_config_dict(tmp_path, train_neg_sample_args={"distribution": "uniform", "sample_num": 1})
    with pytest.raises(ConfigError, match=f"{model} trains with a softmax over all items"):
        Config(model=model, dataset="seralm-tiny", config_dict=cfg)


def test_plugin_config_gives_paup_with_bpr_pairwise_data(tmp_path):
    from recbole.utils import InputType

    from recbole_llm.core.config import Config

    cfg = tiny_config_dict(tmp_path, loss_type="BPR", train_neg_sample_args={"distribution": "uniform", "sample_num": 1})
    assert Config(model="PAUP", dataset="seralm-tiny", config_dict=cfg)["MODEL_INPUT_TYPE"] == InputType.PAIRWISE
