"""Two-stage training of Laser (paper 3.3.2).

Stage 1 (``stage1_epochs``): at every epoch start the whole item matrix is recomputed with the current weights
(batched, no grad, cached by parameter version); the epoch trains against it and is validated with it; the best
epoch's weights and item matrix are kept. Stage 2 (``stage2_epochs``): starts from those weights, keeps that
matrix fixed and trains on; early-stopping patience restarts for the stage, and the best stage-1 state
(saved as the first stage-2 checkpoint) stays the best until a stage-2 epoch validates better. With
``skip_stage1`` the matrix is computed once from the initial weights; with ``skip_stage2`` training ends after
stage 1. The item matrix and the stage live in ``model.other_parameter()``, so checkpoints (weights_only-safe)
carry them and ``resume_checkpoint`` continues in the right stage.

``train_samples_per_epoch`` bounds the work per epoch: the first that many sequences of the epoch's shuffled
order (RecBole's seeded shuffle), i.e. a fresh random subset each epoch.

Zero-shot (paper 4.3, Figure 3): with ``init_checkpoint`` and no epochs in either stage, ``fit`` trains nothing: it
computes this dataset's item matrix with the loaded weights, validates once and saves that model as the best.
"""

import copy
from time import time

import torch
from recbole.trainer import Trainer
from recbole.utils import dict2str, early_stopping, set_color
from torch.nn.utils import clip_grad_norm_
from tqdm.auto import tqdm

from recbole_llm.core.cached_recommender import ensure_trained
from recbole_llm.core.faults import kill_point
from recbole_llm.core.safe_trainer import SafeCheckpointMixin
from recbole_llm.laser.frozen_sr import build_sr_config, frozen_sr_weights_file, set_missing_weights_trainer
from recbole_llm.laser.model import stage_epochs


class LaserTrainer(SafeCheckpointMixin, Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.stage1_epochs, self.stage2_epochs = stage_epochs(config)
        if self.stage1_epochs + self.stage2_epochs <= 0:
            # no epochs: evaluate the weights as they are (an init_checkpoint's, or the untrained model as a control)
            self.logger.info("Laser: no training epochs; evaluating the "
                             + ("init_checkpoint's weights" if config["init_checkpoint"] else "untrained model"))
        self.epochs = self.stage1_epochs + self.stage2_epochs
        self.eval_step = max(1, min(config["eval_step"], self.epochs))
        self.samples_per_epoch = config["train_samples_per_epoch"]
        self._stage1_best = None  # (state_dict, other_parameter) of the best stage-1 epoch
        self._stage1_best_epoch = -1  # that epoch's index

    def _build_optimizer(self, **kwargs):
        # Only the prefix/suffix/M-Former are trained; the frozen LLM and SR never reach the optimizer.
        # The prefix generator may have its own rate (prefix_learning_rate).
        kwargs.setdefault("params", self.model.parameter_groups(kwargs.get("learning_rate", self.learning_rate)))
        return super()._build_optimizer(**kwargs)

    def _checkpoint_state(self, epoch):
        state = super()._checkpoint_state(epoch)
        state["laser_stage"] = int(self.model.training_stage)
        return state

    # ------------------------------------------------------------------------------------------- epochs
    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self._begin_epoch(train_data, epoch_idx)  # resume state is recorded before the item refresh
        if self.model.training_stage == 1:
            if self.model.refresh_item_matrix(show_progress=show_progress):
                self.logger.info(f"epoch {epoch_idx}: item matrix recomputed ({self.model.n_items - 1} items)")
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        limit = self.samples_per_epoch
        n_batches = len(train_data)
        if limit:
            n_batches = min(n_batches, -(-int(limit) // train_data.batch_size))
        iter_data = tqdm(train_data, total=n_batches, ncols=100, disable=not show_progress,
                         desc=set_color(f"Train {epoch_idx:>5} (stage {self.model.training_stage})", "pink"))
        total_loss = None
        for batch_idx, interaction in enumerate(iter_data):
            if batch_idx >= n_batches:
                break
            kill_point("train_batch")
            interaction = interaction.to(self.device)
            self.optimizer.zero_grad()
            losses = loss_func(interaction)
            loss = sum(losses) if isinstance(losses, tuple) else losses
            self._check_nan(loss)
            loss.backward()
            if self.clip_grad_norm:
                clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
            self.optimizer.step()
            self.model.mark_parameters_updated()
            parts = tuple(x.item() for x in losses) if isinstance(losses, tuple) else loss.item()
            total_loss = parts if total_loss is None else (
                tuple(a + b for a, b in zip(total_loss, parts)) if isinstance(parts, tuple) else total_loss + parts)
        return total_loss

    # ----------------------------------------------------------------------------------------- stages
    def _stage_of(self, epoch_idx):
        return 1 if epoch_idx < self.stage1_epochs else 2

    def _snapshot(self):
        return copy.deepcopy(self.model.state_dict()), {
            k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.model.other_parameter().items()}

    def _enter_stage2(self, verbose, saved=False):
        """Load the best stage-1 weights + item matrix (or compute the matrix once), then fix it."""
        if self._stage1_best is not None:
            state, other = self._stage1_best
            self.model.load_state_dict(state)
            self.model.load_other_parameter(other)  # the best epoch's matrix: kept as is, never recomputed
        else:  # stage 1 skipped: one matrix from the current (initial or loaded) weights
            self.model.refresh_item_matrix(show_progress=self.config["show_progress"])
        if self.model.item_tower is None:  # a loaded stage-2 state (resume, init_checkpoint) keeps its own
            self.model.freeze_item_side()  # the weights that made the fixed matrix encode items from now on
        self.model.training_stage = 2
        self.cur_step = 0
        if self._stage1_best is None:
            self.best_valid_score = float("-inf") if self.valid_metric_bigger else float("inf")
            self.best_valid_result = None
        self.optimizer = self._build_optimizer()
        if self._stage1_best is not None and saved:
            # Stage 2 starts from the best stage-1 state, a valid stage-2 model (fixed matrix) whose score
            # stands as the best so far: save it as the stage-2 checkpoint, so a stage-2 epoch replaces it
            # only if it validates better, and a resume from it continues in stage 2. The file already holds these
            # weights (saved when they validated best), so the stage-2 line below names this save instead of a
            # second "Saving current" of the same path.
            self._save_checkpoint(self.stage1_epochs - 1, verbose=False, weights_epoch=self._stage1_best_epoch)
        if verbose:
            origin = ""
            if self._stage1_best is not None:
                origin = " from the best stage-1 state" + (", saved as stage 2's first checkpoint" if saved else "")
            self.logger.info(set_color("Laser stage 2", "yellow") + f": item matrix fixed, training on{origin}")

    def resume_checkpoint(self, resume_file):
        super().resume_checkpoint(resume_file)
        checkpoint_stage = int(self.model.training_stage)
        if checkpoint_stage == 1:
            self._stage1_best = self._snapshot()  # the checkpoint is the best stage-1 epoch so far
            self._stage1_best_epoch = self.start_epoch - 1
        self.logger.info(f"Laser resumes in stage {checkpoint_stage} at epoch {self.start_epoch}")

    def _resume_extra(self):
        return {"stage1_best": self._stage1_best, "stage1_best_epoch": self._stage1_best_epoch}

    def _load_resume_extra(self, extra):
        self._stage1_best = (extra or {}).get("stage1_best")
        # a resume file written before best epochs were kept has none: -1 (unknown) is what a report then shows
        self._stage1_best_epoch = (extra or {}).get("stage1_best_epoch", -1)

    def _zero_shot(self, valid_data, verbose, saved, show_progress):
        """No training: the loaded weights' item matrix, one validation, that model saved as the best."""
        self._enter_stage2(verbose, saved=False)  # computes the item matrix once, from the loaded weights
        if valid_data:
            self.best_valid_score, self.best_valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
            if verbose:
                self.logger.info(set_color("zero-shot valid result", "blue") + ": \n"
                                 + dict2str(self.best_valid_result))
        if saved:
            self._save_checkpoint(-1, verbose=verbose)
        return self.best_valid_score, self.best_valid_result

    @staticmethod
    def prepare_side_models(config, dataset):
        """Before a Laser is built (the run layer calls this): train and cache its frozen SR unless given or cached."""
        prepare_frozen_sr(config)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.model.frozen_sr.ensure_weights()  # a Laser built by a script of its own: train its SR before ours
        try:
            return super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                               callback_fn=callback_fn)
        finally:
            self.model.close_item_workers()  # llm_workers' actors hold LLM copies: free them when training ends

    def _fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        if self.epochs == 0:
            return self._zero_shot(valid_data, verbose, saved, show_progress)
        if saved and self.start_epoch >= self.epochs:
            self._save_checkpoint(-1)
        self.eval_collector.data_collect(train_data)
        if self.start_epoch < self.stage1_epochs and self.model.training_stage == 1:
            self.model.unfreeze_item_side()  # stage 1 trains one shared tower (an init_checkpoint's fixed one goes)
        if self.stage1_epochs == 0 or self.start_epoch >= self.stage1_epochs:
            if self.model.training_stage != 2:
                self._enter_stage2(verbose, saved)
        best_result = self.best_valid_result
        for epoch_idx in range(self.start_epoch, self.epochs):
            if self._stage_of(epoch_idx) == 2 and self.model.training_stage != 2:
                self._enter_stage2(verbose, saved)
            start = time()
            train_loss = self._train_epoch(train_data, epoch_idx, show_progress=show_progress)
            self.train_loss_dict[epoch_idx] = sum(train_loss) if isinstance(train_loss, tuple) else train_loss
            if verbose:
                self.logger.info(self._generate_train_loss_output(epoch_idx, start, time(), train_loss))
            self._add_train_loss_to_tensorboard(epoch_idx, train_loss)

            if self.eval_step <= 0 or not valid_data:
                if self.model.training_stage == 1:
                    self.model.refresh_item_matrix(show_progress=show_progress)  # saved with its own weights' matrix
                if saved:
                    self._save_checkpoint(epoch_idx, verbose=verbose)
                if self.model.training_stage == 1:
                    self._stage1_best, self._stage1_best_epoch = self._snapshot(), epoch_idx
                continue
            if (epoch_idx + 1) % self.eval_step and epoch_idx + 1 != self.stage1_epochs:
                continue
            valid_start = time()
            if self.model.training_stage == 1 and self.model.refresh_item_matrix(show_progress=show_progress):
                # validated (and saved, if best) with the matrix of the weights being validated; the next epoch
                # starts from it
                self.logger.info(f"epoch {epoch_idx}: item matrix recomputed with the epoch's weights for validation")
            valid_score, valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
            self.best_valid_score, self.cur_step, stop_flag, update_flag = early_stopping(
                valid_score, self.best_valid_score, self.cur_step,
                max_step=self.stopping_step, bigger=self.valid_metric_bigger)
            if verbose:
                self.logger.info(set_color(f"epoch {epoch_idx} evaluating (stage {self.model.training_stage})",
                                           "green") + f" [time: {time() - valid_start:.2f}s, valid_score: {valid_score:f}]")
                self.logger.info(set_color("valid result", "blue") + ": \n" + dict2str(valid_result))
            self.tensorboard.add_scalar("Vaild_score", valid_score, epoch_idx)
            if update_flag:
                if saved:
                    self._save_checkpoint(epoch_idx, verbose=verbose)
                if self.model.training_stage == 1:
                    self._stage1_best, self._stage1_best_epoch = self._snapshot(), epoch_idx
                self.best_valid_result = valid_result
                best_result = valid_result
            if callback_fn:
                callback_fn(epoch_idx, valid_score)
            if stop_flag:
                if verbose:
                    self.logger.info(f"Stage {self.model.training_stage}: early stop at epoch {epoch_idx}")
                if self.model.training_stage == 1 and self.stage2_epochs > 0:
                    # stage 1 is done early; stage 2 still runs from its best epoch
                    self._enter_stage2(verbose, saved)
                    self.start_epoch = self.stage1_epochs
                    return self._fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
                break
        if self.model.training_stage == 1 and self._stage1_best is not None and not saved:
            # without a checkpoint file, evaluate() cannot reload the best epoch: keep it in the model now
            state, other = self._stage1_best
            self.model.load_state_dict(state)
            self.model.load_other_parameter(other)
        self.best_valid_result = self.best_valid_result or best_result
        return self.best_valid_score, self.best_valid_result


def prepare_frozen_sr(config):
    """Make sure the frozen SR of a Laser ``config`` has trained weights (given, cached, or trained now)."""
    if config["frozen_sr_checkpoint"]:
        return  # the model reads it (and says so when it does not exist)
    sr_config = build_sr_config(config)
    ensure_trained(sr_config, frozen_sr_weights_file(config, sr_config), show_progress=config["show_progress"])


# a Laser that a stock RecBole script scores before any fit trains its SR on first use through this
set_missing_weights_trainer(ensure_trained)
