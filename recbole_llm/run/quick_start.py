"""Entry points mirroring ``recbole.quick_start``: run, tune objective, reload a saved model.

Differences from RecBole's: plugin Config/model/trainer lookup; dataset YAMLs from ``properties/dataset``
and a model profile picked automatically; a clear error for a missing dataset; safe checkpoint loading;
Ray imported only when a Ray Tune trial asks for it.
"""

import logging
import os
import sys
from logging import getLogger

import torch
import yaml
from recbole.data import create_dataset
from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_llm.core.checkpoint import load_checkpoint
from recbole_llm.core.config import Config
from recbole_llm.core.errors import ConfigError, UserInputError
from recbole_llm.core.locate import check_dataset_available, default_config_files, resolve_profile
from recbole_llm.core.lookup import get_model, get_trainer
from recbole_llm.core.preparation import data_preparation
from recbole_llm.core.run_log import HeldLogFile
from recbole_llm.run.preflight import DataFileError, check_run_inputs


def read_dataset(config):
    """RecBole's ``create_dataset``; a file its reader cannot parse is named in a user error."""
    try:
        return create_dataset(config)
    except ValueError as err:
        raise DataFileError(f"RecBole could not read the atomic files of dataset '{config['dataset']}' in "
                            f"'{config['data_path']}': {err}") from None


def split_config_files(text):
    """``--config_files`` value: file names separated by any whitespace (None when there are none)."""
    return text.split() or None if text else None


def read_config_files(paths):
    """Each user config file must exist, parse as YAML and hold a mapping (an empty file counts as {}).
    Returns (path, settings) of the files that hold settings (empty ones are left out: RecBole's Config cannot
    merge them)."""
    kept = []
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"Config file '{path}' does not exist (--config_files takes YAML files separated "
                              "by spaces).")
        try:
            with open(path, encoding="utf-8") as f:
                content = yaml.load(f.read(), Loader=yaml.FullLoader)  # the loader RecBole's Config uses
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"Config file '{path}' is not valid YAML ({what}{where}); expected 'key: value' "
                              "lines.") from None
        if content is None:
            continue
        if not isinstance(content, dict):
            raise ConfigError(f"Config file '{path}' holds a {type(content).__name__}, expected a mapping of "
                              "'key: value' lines.")
        kept.append((path, content))
    return kept


def run_config_files(model, dataset, config_file_list=None, profile="none"):
    """The YAML files a run merges, in order: the plugin's dataset/profile YAMLs, then the user's own (checked)."""
    user_files = [path for path, _ in read_config_files(list(config_file_list or []))]
    return default_config_files(model, dataset, profile) + user_files


def config_from_files(model, dataset, files, config_dict=None, cmd_args=None):
    """Config from the merged ``files`` (see ``run_config_files``), checked before anything is written."""
    config = Config(model=model, dataset=dataset, config_file_list=files, config_dict=config_dict, cmd_args=cmd_args)
    check_dataset_available(config)
    check_run_inputs(config)
    return config


def build_config(model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=None,
                 profile="none"):
    """Config with the plugin's dataset/profile YAMLs placed before the user's own files."""
    return config_from_files(model, dataset, run_config_files(model, dataset, config_file_list, profile),
                             config_dict, cmd_args)


def log_parameter_counts(model, logger):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(set_color("parameters", "blue") + f": trainable {trainable:,} / total {total:,} "
                f"({100.0 * trainable / max(total, 1):.4f}% trainable)")


def build_model(config, dataset):
    """``config["model"]`` on ``dataset``, on the config's device, after its trainer has prepared the side models
    it reads but does not train (Laser: the frozen SR, trained and cached once). Leaves the RNG as found."""
    trainer_class = get_trainer(config["MODEL_TYPE"], config["model"])
    prepare = getattr(trainer_class, "prepare_side_models", None)
    if prepare is not None:
        prepare(config, dataset)
    return get_model(config["model"])(config, dataset).to(config["device"])


def run_recbole_llm(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True,
                    queue=None, cmd_args=None, profile="none"):
    """Train and test ``model`` on ``dataset`` (RecBole's ``run_recbole`` with plugin lookup).

    Returns the same dict as ``run_recbole``.
    """
    files = run_config_files(model, dataset, config_file_list, profile)
    config = config_from_files(model, dataset, files, config_dict, cmd_args)
    init_seed(config["seed"], config["reproducibility"])
    log_file = HeldLogFile(config)  # the log file appears once the data is read and the model built
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(f"config files: {files} (profile {resolve_profile(profile)})")
    logger.info(config)
    try:
        dataset = read_dataset(config)
        logger.info(dataset)
        train_data, valid_data, test_data = data_preparation(config, dataset)

        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model = build_model(config, train_data._dataset)
    except UserInputError:
        log_file.discard()
        raise
    finally:
        log_file.release()  # no-op after discard(); a crash keeps its log
    logger.info(model)
    log_parameter_counts(model, logger)

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if config["resume_checkpoint"]:
        trainer.resume_checkpoint(config["resume_checkpoint"])
    elif hasattr(trainer, "resume_interrupted_run"):  # every trainer get_trainer returns has it
        if config["resume"]:
            trainer.resume_interrupted_run()
        else:
            trainer.warn_if_interrupted_run()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")

    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "saved_model_file": getattr(trainer, "saved_model_file", None) if saved else None,
        **training_extent(trainer, saved),
    }
    if not config["single_spec"]:
        torch.distributed.destroy_process_group()
    if config["local_rank"] == 0 and queue is not None:
        queue.put(result)
    return result


def training_extent(trainer, saved):
    """``epochs_run`` (epochs this process trained) and ``best_epoch`` (the epoch of the saved best model, when
    saved): whether a run stopped early after its best epoch or ran out of epochs while still improving."""
    extent = {"epochs_run": len(getattr(trainer, "train_loss_dict", {}) or {})}
    path = getattr(trainer, "saved_model_file", None)
    if saved and path and os.path.isfile(path):
        checkpoint = load_checkpoint(path, map_location="cpu")
        # best_epoch: the epoch the weights come from (SafeCheckpointMixin); a checkpoint without it, its epoch
        extent["best_epoch"] = int(checkpoint.get("best_epoch", checkpoint.get("epoch", -1)))
    return extent


def run_recbole_llms(rank, *args):
    """``mp.spawn`` target: one DDP process (rank) of ``run_recbole_llm``."""
    kwargs = dict(args[-1])
    kwargs["config_dict"] = dict(kwargs.get("config_dict") or {}, local_rank=rank)
    run_recbole_llm(*args[:3], **kwargs)


def objective_function(config_dict=None, config_file_list=None, saved=True, model=None, dataset=None,
                       profile="none", report_to_ray=None):
    """Objective for RecBole's HyperTuning and for Ray Tune trials (same signature as RecBole's first two
    arguments). ``model``/``dataset`` may also come from ``config_dict`` or the config files.

    ``report_to_ray``: None (no Ray), "epoch" (report the validation score after every evaluation, so a
    scheduler such as ASHA can stop the trial early, then the test result once) or "trial" (report once).
    """
    config_dict = dict(config_dict or {})
    model = model or config_dict.get("model")
    dataset = dataset or config_dict.get("dataset")
    config = build_config(model, dataset, config_file_list, config_dict, cmd_args=[], profile=profile)
    init_seed(config["seed"], config["reproducibility"])
    logger = getLogger()
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
    init_logger(config)
    logging.basicConfig(level=logging.ERROR)
    data = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"], config["reproducibility"])
    net = build_model(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)

    report = None
    if report_to_ray:
        from ray.air import session  # heavy: ray, ~0.4 s to import; only Ray Tune trials need it

        report = session.report
    def report_epoch(epoch_idx, valid_score):
        report({"valid_score": float(valid_score), "epoch": epoch_idx})

    callback = report_epoch if report_to_ray == "epoch" else None

    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, verbose=False, saved=saved,
                                                      callback_fn=callback)
    test_result = trainer.evaluate(test_data, load_best_model=saved)
    if report is not None:  # once per trial (RecBole's own path reports twice and fails on ray 2.6)
        report({"valid_score": float(best_valid_score), "best_valid_score": float(best_valid_score),
                **{f"valid_{k}": float(v) for k, v in (best_valid_result or {}).items()},
                **{f"test_{k}": float(v) for k, v in test_result.items()}})
    return {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }


def load_data_and_model(model_file, trust_pickled_code=False):
    """Reload a saved model with its data (RecBole's function, loading the checkpoint safely).

    A model saved on a GPU is reloaded on the CPU (and ``config["device"]`` says so) when CUDA is absent."""
    checkpoint = load_checkpoint(model_file, trust_pickled_code=trust_pickled_code)  # CPU when no CUDA
    config = checkpoint["config"]
    if torch.device(config["device"]).type == "cuda" and not torch.cuda.is_available():
        config["device"] = torch.device("cpu")
        config["use_gpu"] = False
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)
    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = build_model(config, train_data._dataset)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data
