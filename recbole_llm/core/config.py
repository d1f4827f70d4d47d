"""RecBole ``Config`` that also knows the plugin's models.

Differences from ``recbole.config.Config``:
- merges ``recbole_llm/<method>/<Model>.yaml`` (the plugin's defaults) into the internal config;
- supplies the numpy aliases RecBole still uses (``np.float`` ...) in a way that also works on numpy 2;
- parses ``--key=value`` from ``sys.argv`` only when asked or when the process is a plain script, so
  pytest or Ray worker flags never end up in a config;
- pickles without the two attributes that hold classes, so checkpoints load with ``weights_only=True``.
"""

import os
import sys

import numpy as np
import torch
import yaml
from recbole.config import Config as RecBoleConfig
from recbole.utils import InputType, ModelType
from recbole.utils.argument_list import dataset_arguments

from recbole_llm.core.errors import ConfigError, UserInputError
# re-exported: most modules read keys and find the YAMLs through recbole_llm.core.config
from recbole_llm.core.keys import config_get, plugin_model_yaml, plugin_model_yamls  # noqa: F401
from recbole_llm.core.registry import get_model
from recbole_llm.core.validation import validate_config


def apply_plugin_defaults(config, model_name):
    """Fill ``config`` with the plugin's YAML defaults for ``model_name`` when it was built by RecBole's own
    ``Config`` (e.g. ``recbole.quick_start.run_recbole(model="Laser")``), which does not know the plugin's
    YAMLs. Values the user gave (files, dicts, flags) are kept; RecBole's internal defaults are overridden,
    as the plugin ``Config`` does. A plugin ``Config`` is left untouched."""
    if isinstance(config, Config) or getattr(config, "_plugin_defaults_applied", False):
        return  # a plugin Config already merged them; a subclass's call (PAUPSeRALM -> PAUP) must not override
    config._plugin_defaults_applied = True
    paths = plugin_model_yamls(model_name)
    if not paths:
        return
    loader = getattr(config, "yaml_loader", None) or RecBoleConfig._build_yaml_loader(config)
    defaults = {}
    for path in paths:
        with open(path) as f:
            defaults.update(yaml.load(f, Loader=loader) or {})  # RecBole's loader: reads 1e-4 as a float

    # The data and its loaders exist before the model does: keys they read (negative sampling, batch
    # sizes, history length...) cannot change here without making the config lie about the run.
    data_keys = set(dataset_arguments) | {"train_batch_size", "eval_batch_size", "train_neg_sample_args",
                                          "valid_neg_sample_args", "test_neg_sample_args", "eval_args"}
    user_keys = set(getattr(config, "external_config_dict", {}) or {})
    for key, value in defaults.items():
        if key not in user_keys and key not in data_keys:
            config[key] = value


def _foreign_argv():
    """True when sys.argv belongs to a host program (pytest, a Ray worker) rather than to us."""
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    # pytest, py.test, or python -m pytest (argv[0] is .../pytest/__main__.py)
    if "pytest" in sys.modules and ("pytest" in prog or prog.startswith("py.test")
                                    or (sys.argv and sys.argv[0].endswith(os.path.join("pytest", "__main__.py")))):
        return True
    return "ray" in sys.argv[0] and ("worker" in prog or "_private" in sys.argv[0])


class Config(RecBoleConfig):
    """Config with plugin model defaults.

    Args:
        cmd_args (list[str] | None): ``--key=value`` strings to parse as command-line config. ``None`` reads
            ``sys.argv[1:]`` unless the process is pytest or a Ray worker (then nothing is read).
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=None):
        self._cmd_args = cmd_args
        try:
            super().__init__(model, dataset, config_file_list, config_dict)
        except UserInputError:
            raise
        except ValueError as err:  # RecBole's Config refuses the user's settings with plain ValueErrors
            raise ConfigError(str(err)) from err
        validate_config(self)
        settle = getattr(self.model_class, "settle_config", None)  # keys a model derives from others (Laser: epochs)
        if settle is not None:
            settle(self)

    def compatibility_settings(self):
        # RecBole 1.2.1 uses np.float/np.int/np.bool; numpy>=1.24 removed them and numpy 2 removed np.float_.
        for alias, target in (("bool", np.bool_), ("int", np.int_), ("float", np.float64),
                              ("complex", np.complex128), ("object", np.object_), ("str", np.str_),
                              ("long", np.int_), ("unicode", np.str_)):
            if alias not in np.__dict__:
                setattr(np, alias, target)

    def _load_cmd_line(self):
        args = self._cmd_args
        if args is None:
            args = [] if _foreign_argv() else sys.argv[1:]
        saved, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "recbole_llm"] + list(args)
        try:
            return super()._load_cmd_line()
        finally:
            sys.argv = saved

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        # Plugin defaults come after RecBole's internal files; user files, dicts and flags still override them.
        for path in plugin_model_yamls(model):
            self._update_internal_config_dict(path)

    def _set_default_parameters(self):
        # RecBole rejects its own default negative sampling for CE-loss sequential models; drop it unless
        # the user asked for sampling explicitly (then RecBole's error stands).
        final = self.final_config_dict
        if (final.get("loss_type") == "CE" and "train_neg_sample_args" not in self.external_config_dict
                and self.internal_config_dict.get("MODEL_TYPE") == ModelType.SEQUENTIAL):
            final["train_neg_sample_args"] = None
        super()._set_default_parameters()
        # A plugin model that declares input_type for RecBole's own Config (PAUP) but also trains with BPR:
        # pairwise data then, as RecBole would pick from loss_type.
        if getattr(self.model_class, "input_type_follows_loss_type", False) and final.get("loss_type") == "BPR":
            final["MODEL_INPUT_TYPE"] = InputType.PAIRWISE

    def _init_device(self):
        final = self.final_config_dict
        asked = str(self.external_config_dict.get("device") or "")
        if asked.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={asked!r} asks for CUDA, but torch {torch.__version__} sees no CUDA device "
                              "(a CPU-only torch build or no GPU); use --device=cpu, or leave device unset "
                              "(RecBole then uses the GPU when there is one).")

        if "local_rank" not in final or (torch.cuda.is_available() and str(final["gpu_id"]) != ""):
            super()._init_device()
            # RecBole 1.2 picks CUDA whenever it is there, ignoring ``use_gpu: False`` (which its trainer still
            # reads) and a user's ``device: cpu``; both mean the CPU here, as its docs say.
            if final["device"].type == "cuda" and (final.get("use_gpu") is False or asked.startswith("cpu")):
                final["device"] = torch.device("cpu")
            return
        # RecBole's DDP set-up is NCCL-only; without CUDA the same run uses gloo on the CPU.
        final["gpu_id"] = ""
        # N processes share the cores; without this each one starts a thread per core and they thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(final["nproc"]))))
        torch.distributed.init_process_group(
            backend="gloo", rank=final["local_rank"] + final["offset"], world_size=final["world_size"],
            init_method=f"tcp://{final['ip']}:{final['port']}")
        final["device"] = torch.device("cpu")
        final["single_spec"] = False
        if final["local_rank"] != 0:
            final["state"] = "error"
            final["show_progress"] = False
            final["verbose"] = False

    # Pickling: drop attributes holding classes, rebuild them on load.
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("yaml_loader", None)
        state.pop("model_class", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.yaml_loader = self._build_yaml_loader()
        try:
            self.model_class = get_model(self.model)
        except ValueError:
            self.model_class = None
