"""Trainer mixin whose checkpoints load with ``torch.load(weights_only=True)`` and whose runs can be resumed
exactly after being killed (see ``recbole_llm.core.resume``)."""

import functools
import os
from collections import Counter

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch.nn.parallel import DistributedDataParallel

from recbole_llm.core.checkpoint import atomic_torch_save, load_checkpoint
from recbole_llm.core.config import Config
from recbole_llm.core.faults import with_kill_point
from recbole_llm.core.keys import trusts_pickled_code
from recbole_llm.core.resume import (capture_random_state, data_files_digest, other_resume_states,
                                     restore_random_state, resume_state_path, run_fingerprint)


def as_plugin_config(config):
    """The config as a plugin ``Config`` (a stock RecBole Config pickles two classes that the safe loader
    refuses; the plugin Config drops them when saved and rebuilds them when loaded)."""
    if isinstance(config, Config):
        return config
    converted = Config.__new__(Config)
    converted.__dict__.update(config.__dict__)
    return converted


_NAMES_USED = Counter()


def unique_checkpoint_name(path):
    """RecBole's ``<Model>-<time to the second>.pth`` plus this process's id (and a count when one process builds
    several trainers in that second): runs started in the same second (a script, parallel tuning trials) would
    otherwise write, load and delete one another's checkpoint."""
    base, ext = os.path.splitext(path)
    _NAMES_USED[base] += 1
    count = _NAMES_USED[base]
    return f"{base}-{os.getpid()}{'' if count == 1 else f'-{count}'}{ext}"


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
        self.saved_model_file = unique_checkpoint_name(self.saved_model_file)
        if distributed:
            if on_cpu:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
                self.distributed_model = DistributedDataParallel(self.model)
            # Each rank names the checkpoint after its own clock; use rank 0's name everywhere so that
            # evaluate(load_best_model=True) on every rank reads the file rank 0 wrote.
            name = [self.saved_model_file]
            torch.distributed.broadcast_object_list(name, src=0)
            self.saved_model_file = name[0]
        self.resume_state_file = resume_state_path(config)
        self._write_resume_state = False
        self._pending_random_state = None

    # ------------------------------------------------------------------------------ resumable training
    def _is_main_rank(self):
        return self.config["single_spec"] or self.config["local_rank"] == 0

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        # Without saved checkpoints (e.g. tuning trials) there is nothing to resume from.
        self._write_resume_state = saved and self._is_main_rank()
        result = self._fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                           callback_fn=callback_fn)
        if self._write_resume_state and os.path.exists(self.resume_state_file):
            os.remove(self.resume_state_file)  # finished: a rerun starts a new run
        return result

    def _fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """The training loop (RecBole's); trainers with their own loop override this, not ``fit``."""
        return super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                           callback_fn=callback_fn)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self._begin_epoch(train_data, epoch_idx)
        loss_func = with_kill_point(loss_func or self.model.calculate_loss, "train_batch")
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    def _begin_epoch(self, train_data, epoch_idx):
        """Restore a resumed run's random state; then record the state this epoch starts from, so that a run
        killed during the epoch (or its validation) can redo it exactly."""
        if self._pending_random_state is not None:
            restore_random_state(self._pending_random_state, train_data)
            self._pending_random_state = None
        if self._write_resume_state:
            atomic_torch_save(self._resume_state(train_data, epoch_idx), self.resume_state_file)

    def _resume_state(self, train_data, epoch_idx):
        """A checkpoint of the finished epochs (``epoch_idx - 1``) plus what an exact continuation needs."""
        return {
            **self._checkpoint_state(epoch_idx - 1),
            "fingerprint": run_fingerprint(self.config),
            "best_valid_result": self.best_valid_result,
            "saved_model_file": self.saved_model_file,
            "train_loss_dict": dict(self.train_loss_dict),
            "random": capture_random_state(train_data),
            "extra": self._resume_extra(),
        }

    def _resume_extra(self):
        """Trainer-specific state for the resume file (weights_only-loadable values)."""
        return None

    def _load_resume_extra(self, extra):
        pass

    def resume_interrupted_run(self):
        """Continue the run that left this config's resume-state file; returns False when there is none."""
        path = self.resume_state_file
        if not os.path.isfile(path):
            others = other_resume_states(self.config)
            if others:
                self.logger.warning(
                    f"--resume=True, but no interrupted run matches this config and data ({path} does not exist). "
                    f"Resume state(s) {', '.join(others)} were written with a different config or different data "
                    "files: this run starts over from epoch 0 (run with that config and data to continue it, or "
                    "delete the file).")
            else:
                self.logger.info(f"No interrupted run to resume ({path} does not exist): starting from epoch 0")
            return False
        # On the CPU: torch's and the loader's RNG states must be CPU tensors; weights and optimizer state are
        # copied onto the model's device by load_state_dict.
        state = load_checkpoint(path, map_location="cpu")
        if state.get("fingerprint") != run_fingerprint(self.config):
            raise RuntimeError(f"Resume state '{path}' was written for a different config; delete it to start over.")
        self._restore_training_state(state)
        self.best_valid_result = state["best_valid_result"]
        self.train_loss_dict.update(state["train_loss_dict"])
        if os.path.isfile(state["saved_model_file"]):
            self.saved_model_file = state["saved_model_file"]  # keep improving (and finally load) that file
        self._pending_random_state = state["random"]
        self._load_resume_extra(state.get("extra"))
        self.logger.info(f"Resuming the interrupted run from the start of epoch {self.start_epoch} ({path})")
        return True

    def warn_if_interrupted_run(self):
        if os.path.isfile(self.resume_state_file):
            self.logger.warning(f"An interrupted run with this config left {self.resume_state_file}; this run "
                                "starts over (pass --resume=True to continue that run instead)")

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
            "data_digest": data_files_digest(self.config),  # recommend refuses a checkpoint whose data changed
        }

    def _save_checkpoint(self, epoch, verbose=True, weights_epoch=None, **kwargs):
        """``epoch`` is where a resume continues; ``weights_epoch`` the epoch the weights come from when a trainer
        saves them later than that epoch (Laser's stage 2 starts from its best stage-1 epoch), kept as
        ``best_epoch`` for reports."""
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state = self._checkpoint_state(epoch)
        state["best_epoch"] = epoch if weights_epoch is None else weights_epoch
        atomic_torch_save(state, saved_model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def _load_checkpoint_file(self, path):
        trust = trusts_pickled_code(self.config)
        return load_checkpoint(path, map_location=self.device, trust_pickled_code=trust)

    def _restore_training_state(self, checkpoint):
        """Weights, optimizer and early-stopping state of a ``_checkpoint_state`` dict; training continues
        with the epoch after the one it was saved at."""
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.optimizer.load_state_dict(checkpoint["optimizer"])

    def resume_checkpoint(self, resume_file):
        checkpoint = self._load_checkpoint_file(resume_file)
        if checkpoint["config"]["model"].lower() != self.config["model"].lower():
            self.logger.warning(
                "Architecture configuration given in config file is different from that of checkpoint. "
                "This may yield an exception while state_dict is being loaded."
            )
        self._restore_training_state(checkpoint)
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")


@functools.lru_cache(maxsize=None)
def safe_trainer_class(base):
    """``base`` (a RecBole trainer class) with safe checkpoints; the same class object for the same base."""
    if issubclass(base, SafeCheckpointMixin):
        return base
    return type(f"Safe{base.__name__}", (SafeCheckpointMixin, base), {"__module__": __name__})


# RecBole's Trainer with safe checkpoints, registered for plugin models that train the RecBole way (PAUP), so that a
# stock ``run_recbole`` writes checkpoints that ``load_data_and_model`` reads with ``weights_only=True``.
SafeTrainer = safe_trainer_class(Trainer)
