"""Trainer mixin whose checkpoints load with ``torch.load(weights_only=True)``."""

import functools

from recbole.utils import set_color

from recbole_llm.checkpoint import atomic_torch_save, load_checkpoint


class SafeCheckpointMixin:
    """Overrides RecBole's checkpoint write (protocol 4, not atomic) and resume (bare torch.load)."""

    def _checkpoint_state(self, epoch):
        return {
            "config": self.config,
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
