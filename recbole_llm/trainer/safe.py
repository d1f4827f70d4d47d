"""Trainer mixin whose checkpoints load with ``torch.load(weights_only=True)``."""

import functools

import torch
from recbole.utils import set_color
from torch.nn.parallel import DistributedDataParallel

from recbole_llm.checkpoint import atomic_torch_save, load_checkpoint


def as_plugin_config(config):
    """The config as a plugin ``Config`` (a stock RecBole Config pickles two classes that the safe loader
    refuses; the plugin Config drops them when saved and rebuilds them when loaded)."""
    from recbole_llm.config import Config

    if isinstance(config, Config):
        return config
    converted = Config.__new__(Config)
    converted.__dict__.update(config.__dict__)
    return converted


class SafeCheckpointMixin:
    """Overrides RecBole's checkpoint write (protocol 4, not atomic) and resume (bare torch.load), and
    makes its DDP set-up work on the CPU with one checkpoint name shared by all ranks."""

    def __init__(self, config, model):
        distributed = not config["single_spec"]
        on_cpu = config["device"].type == "cpu"
        if distributed and on_cpu:
            # RecBole wraps the model with device_ids=[rank], which DDP refuses for CPU modules; build the
            # trainer as single-process and wrap the model ourselves.
            config["single_spec"] = True
        try:
            super().__init__(config, model)
        finally:
            config["single_spec"] = not distributed
        if distributed:
            if on_cpu:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
                self.distributed_model = DistributedDataParallel(self.model)
            # Each rank names the checkpoint after its own clock; use rank 0's name everywhere so that
            # evaluate(load_best_model=True) on every rank reads the file rank 0 wrote.
            name = [self.saved_model_file]
            torch.distributed.broadcast_object_list(name, src=0)
            self.saved_model_file = name[0]

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and not self.config["single_spec"]:
            torch.distributed.barrier()  # rank 0 may still be writing the best checkpoint
        return super().evaluate(eval_data, load_best_model=load_best_model, model_file=model_file,
                                show_progress=show_progress)

    def _checkpoint_state(self, epoch):
        return {
            "config": as_plugin_config(self.config),
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        atomic_torch_save(self._checkpoint_state(epoch), saved_model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def _load_checkpoint_file(self, path):
        trust = bool(self.config["trust_pickled_checkpoint"]) if "trust_pickled_checkpoint" in self.config else False
        return load_checkpoint(path, map_location=self.device, trust_pickled_code=trust)

    def resume_checkpoint(self, resume_file):
        checkpoint = self._load_checkpoint_file(resume_file)
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        if checkpoint["config"]["model"].lower() != self.config["model"].lower():
            self.logger.warning(
                "Architecture configuration given in config file is different from that of checkpoint. "
                "This may yield an exception while state_dict is being loaded."
            )
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")


@functools.lru_cache(maxsize=None)
def safe_trainer_class(base):
    """``base`` (a RecBole trainer class) with safe checkpoints; the same class object for the same base."""
    if issubclass(base, SafeCheckpointMixin):
        return base
    return type(f"Safe{base.__name__}", (SafeCheckpointMixin, base), {"__module__": __name__})
