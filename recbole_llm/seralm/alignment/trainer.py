r"""AlignmentTrainer: SeRALM's alignment training (paper 4.4, Algorithm 1) around RecBole's Trainer.

``fit`` runs three phases (the paper gives no schedule; this ordering is ours and explicit):

- Phase A, warm-up (``align_warmup_epochs``, default 1): RecBole epochs of the recommender on the base
  (unaligned) knowledge, so that p(y|x,s) is a meaningful signal when alignment starts.
- Phase B, alignment (``alignment_epochs`` passes over the training data, or ``alignment_steps`` steps):
  Algorithm 1 per batch (x, y). The generator job (``generator_mode``: sync | ray) samples knowledge s
  with its LLM snapshot, encodes it, and returns p(y|x,s) (recommender snapshot), p(y|x) (frozen
  recommender pre-trained without knowledge) and per-token log p_orig(s|x). The trainer then
    line 5 / Eq. 9:  recommender step maximising log p(y|x,s) (its CE loss with s as knowledge override);
    line 6 / Eq. 8:  LLM (LoRA) step on  -mean w * log p_theta(s|x) + alpha * KL(p_theta || p_orig),
                     w = p(y|x,s)/p(y|x) detached (optionally clipped at ``align_ratio_clip``).
  Snapshots go to the generator every ``refresh_every`` steps (paper: 50).
- Phase C: knowledge of every item is regenerated with the aligned LLM (greedy, as the base knowledge;
  cached under adapter_version = digest of the LoRA weights) and re-encoded; the model's knowledge
  matrix is replaced; then RecBole's own ``fit`` trains and validates the recommender (early stopping,
  checkpoints). The LoRA adapter is saved beside each checkpoint as ``<checkpoint>-lora.safetensors``.

``alignment: False`` skips A-C: exactly RecBole's Trainer (the paper's Base+NA_LLM).

``--resume=True`` continues an alignment that was killed in phase B or C (see ``alignment_resume``).

Choices where the paper is silent or loose (each is a config key, paper behaviour as default where it has one):
- which items get sampled knowledge: the ``align_history_items`` most recent history items per instance,
  one sample per distinct item per batch (see generator.py);
- the KL term: Eq. 7's sampled difference has a non-zero gradient even when both LLMs agree, so the
  default per-token estimator is k2 (``kl_estimator``), whose gradient is the score-function KL gradient;
- normalisation: policy term = mean over instances of w * sum over tokens of log p(s|x); KL = mean over
  texts of the per-token sum; no clipping of w unless ``align_ratio_clip`` is set;
- off-policy samples (snapshot older than the current LLM) are used without importance correction, as the
  paper's asynchronous generation does;
- the frozen base p(y|x) is the variant's own base architecture trained once on the same split
  (``frozen_base_model``/``frozen_base_checkpoint``); the warm-up phase A and the regenerate phase C are
  our explicit schedule around Algorithm 1;
- alignment runs in one process (no DDP);
- ``train_text_encoder`` (paper 4.3: the encoder is trained jointly with the recommender): the encoder is part
  of the recommender (theta_r). Line 5 encodes each sampled s and the batch's other items with it, with
  gradients; the generator encodes s with the snapshot's encoder; phase C re-encodes the aligned texts with it.
"""

import os
import time
from collections import deque

import recbole
import torch
import yaml
from recbole.trainer import Trainer
from recbole.utils import set_color
from safetensors.torch import save_file
from tqdm.auto import tqdm

from recbole_llm.core.cached_model import DATA_KEYS, cache_key, preserved_rng
from recbole_llm.core.checkpoint import atomic_torch_save, load_checkpoint
from recbole_llm.core.config import Config, config_get, plugin_model_yamls
# cached_recommender and knowledge (below) are called through their modules, so tests that monkeypatch
# knowledge.generate_knowledge or cached_recommender.trained_recommender reach these calls
from recbole_llm.core import cached_recommender
from recbole_llm.core.errors import ConfigError
from recbole_llm.core.faults import kill_point
from recbole_llm.core.fileio import atomic_path
from recbole_llm.core.fingerprint import data_digest
from recbole_llm.core.keys import seralm_get, trusts_pickled_code
from recbole_llm.llm.generate import sequence_logprobs
from recbole_llm.seralm import knowledge
from recbole_llm.seralm.alignment.loss import alignment_llm_loss, importance_weights
from recbole_llm.seralm.alignment.resume import (
    alignment_state_path,
    loader_state,
    remove_alignment_state,
    replay_loader,
)
from recbole_llm.seralm.sampler import (
    KnowledgeEncoder,
    RayGenerator,
    SyncGenerator,
    by_sampled_items,
    cpu_state,
    generator_options,
    instance_items_from,
    item_prompts,
)
from recbole_llm.core.resume import capture_random_state, restore_random_state, run_fingerprint
from recbole_llm.core.safe_trainer import SafeCheckpointMixin
from recbole_llm.llm.lora import build_lora_llm, load_lora_state, lora_state, state_digest


# --------------------------------------------------------------------------- frozen base recommender
def base_model_name(config):
    """``frozen_base_model`` or the SeRALM variant's base architecture (SASRecSeRALM -> SASRec)."""
    name = config_get(config, "frozen_base_model")
    if name:
        return name
    model = str(config["model"])
    if not model.endswith("SeRALM"):
        raise ValueError(f"frozen_base_model is not set and model '{model}' is not a <Base>SeRALM name; "
                         "set frozen_base_model to the RecBole model that gives p(y|x).")
    return model[: -len("SeRALM")]


def _model_yaml_keys(name):
    """Hyperparameter keys of a model: its RecBole YAML, or the plugin's."""
    keys = set()
    for path in (os.path.join(os.path.dirname(recbole.__file__), "properties", "model", f"{name}.yaml"),
                 *plugin_model_yamls(name)):
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                keys.update((yaml.safe_load(f) or {}).keys())
    return keys


def frozen_base_config_dict(config, name):
    """Config of the frozen base: the SeRALM run's data/split keys and the base architecture's own
    hyperparameters taken from the SeRALM config (same sizes), trained for ``frozen_base_epochs``."""
    values = {k: config[k] for k in DATA_KEYS if k in config and config[k] is not None}
    for key in _model_yaml_keys(name) | {"learning_rate", "train_batch_size", "stopping_step", "weight_decay",
                                          "loss_type", "eval_step"}:
        if key in config and config[key] is not None:
            values[key] = config[key]
    if "data_path" in values:  # RecBole's final data_path already ends with the dataset's folder
        values["data_path"] = os.path.dirname(os.path.normpath(str(values["data_path"])))
    # 'device' is derived by RecBole from use_gpu/gpu_id (copied above); plugin configs reject it as a key.
    values.pop("device", None)
    values.update(loss_type="CE", train_neg_sample_args=None,
                  epochs=int(config_get(config, "frozen_base_epochs", config["epochs"])))
    return values


def load_frozen_base(config, dataset):
    """The frozen recommender giving p(y|x): from ``frozen_base_checkpoint``, else trained once on the same
    data/split and cached (``frozen_base_cache_dir`` or <checkpoint_dir>/frozen_base), keyed by the dataset
    files' digest and the base's config (trained and cached by recbole_llm.core.cached_recommender).
    Global RNG state is left as found."""
    name = base_model_name(config)
    values = frozen_base_config_dict(config, name)
    with preserved_rng():
        base_config = Config(model=name, dataset=config["dataset"], config_dict=values, cmd_args=[])
    key = cache_key(values, data_digest(config))
    folder = config_get(config, "frozen_base_cache_dir") or os.path.join(config["checkpoint_dir"], "frozen_base")
    model = cached_recommender.trained_recommender(
        base_config, dataset, given=config_get(config, "frozen_base_checkpoint"), key="frozen_base_checkpoint",
        cache_file=os.path.join(folder, f"{name}-{config['dataset']}-{key}.pth"),
        show_progress=bool(config["show_progress"]),
        trust=trusts_pickled_code(config))
    model.to(config["device"]).eval()
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------ adapter
def adapter_path(checkpoint_file):
    """Where the LoRA adapter of a checkpoint lives: beside it, ``<name>-lora.safetensors``."""
    root, _ = os.path.splitext(checkpoint_file)
    return root + "-lora.safetensors"


def save_adapter(state, path, version):
    """safetensors file of the LoRA state, written atomically (temp file + rename)."""
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"adapter_version": version})


# ------------------------------------------------------------------------------------------ trainer
class AlignmentTrainer(SafeCheckpointMixin, Trainer):
    """RecBole Trainer plus SeRALM alignment (phases A-C above) when ``alignment`` is True."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.alignment = bool(seralm_get(config, "alignment"))
        self.alpha = float(seralm_get(config, "alpha"))
        ratio_clip = config_get(config, "align_ratio_clip")
        self.ratio_clip = None if ratio_clip is None else float(ratio_clip)
        self.kl_estimator = seralm_get(config, "kl_estimator")
        self.baseline = seralm_get(config, "align_baseline")
        self.generator_mode = seralm_get(config, "generator_mode")  # the YAMLs' default
        self.refresh_every = int(seralm_get(config, "refresh_every"))
        self.llm = self.tokenizer = None
        self.adapter_version = None
        self.aligned = False
        self.alignment_log = []  # per step: losses, weights, timings
        self.alignment_state_file = alignment_state_path(config)
        self.align_resume_every = int(seralm_get(config, "align_resume_every"))
        self._write_alignment_state = False
        self._alignment_resume = None  # the loaded state of an interrupted alignment
        self._last_snapshot = None  # (lora, rec_state) last sent to the generator
        self._loader_start = None  # train loader state at the start of phase B

    def _build_optimizer(self, **kwargs):
        # warm_start_learning_rate: a converged model trained on at the base's own rate from a fresh Adam state
        # falls in its first epoch
        warm_rate = config_get(self.config, "warm_start_learning_rate")
        if self.config["base_warm_start"] and warm_rate is not None:
            kwargs.setdefault("learning_rate", float(warm_rate))
        return super()._build_optimizer(**kwargs)

    # ----------------------------------------------------------------------------------- fit
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._write_alignment_state = saved and self._is_main_rank()
        fresh = self.start_epoch == 0 and self._alignment_resume is None and not self.aligned
        warm = self.config["base_warm_start"] and fresh
        if warm:
            self.warm_start_from_base(train_data._dataset)
        if self.alignment and not self.aligned:
            self.align(train_data, show_progress=show_progress)
        if warm and valid_data is not None:
            self.validate_start(valid_data, verbose=verbose, saved=saved, show_progress=show_progress)
        result = super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                             callback_fn=callback_fn)
        if self._write_alignment_state:
            remove_alignment_state(self.alignment_state_file)  # finished: a rerun aligns again
        return result

    def warm_start_from_base(self, dataset):
        """``base_warm_start``: start the variant from the trained base (the cached frozen base of the alignment, the
        same architecture and hyperparameters trained without knowledge). With the ``project`` fusion at [I ; 0] the
        variant then computes exactly that trained base, and training goes on with the knowledge joined."""
        embedding = self.model.item_embedding
        if getattr(embedding, "concat", None) != "project":
            raise ConfigError("base_warm_start: True needs knowledge_concat: project (the variant holds the base's "
                              f"weights unchanged); got knowledge_concat: {self.config['knowledge_concat']!r}.")
        base = load_frozen_base(self.config, dataset)
        state = {("item_embedding.id_embedding.weight" if key == "item_embedding.weight" else key): value
                 for key, value in base.state_dict().items()}
        result = self.model.load_state_dict(state, strict=False)
        own = ("item_embedding.fusion.", "item_embedding.knowledge_projection.", "item_embedding.knowledge_vectors",
               "text_encoder.", "knowledge_text_store.")
        missing = [k for k in result.missing_keys if not k.startswith(own)]
        if missing or result.unexpected_keys:
            raise ConfigError(f"base_warm_start: the trained {base_model_name(self.config)} does not fit "
                              f"{self.config['model']} (missing {missing}, unexpected {result.unexpected_keys}).")
        self.logger.info(set_color("SeRALM", "green") + f": started from the trained {base_model_name(self.config)} "
                         "(base_warm_start); the knowledge fusion starts at [I ; 0]")

    def validate_start(self, valid_data, verbose=True, saved=True, show_progress=False):
        """A warm-started model is validated before its first epoch and saved as the best so far (epoch -1):
        early stopping then keeps it unless an epoch validates better, so the variant cannot end below, on
        validation, the trained base it starts from (RecBole's loop validates only after training). With
        alignment, the model validated is the one phases A-C leave."""
        self.best_valid_score, self.best_valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
        if verbose:
            self.logger.info(set_color("SeRALM", "green") + f": the warm start validates at {self.best_valid_score:f}"
                             " (the score an epoch must beat)")
        if saved:
            self._save_checkpoint(-1, verbose=verbose)

    def align(self, train_data, show_progress=False):
        """Phases A (warm-up), B (Algorithm 1) and C (regenerate + re-encode all knowledge)."""
        dataset = train_data._dataset
        resumed, self._alignment_resume = self._alignment_resume, None
        if resumed is None:
            warmup = int(seralm_get(self.config, "align_warmup_epochs"))
            for epoch in range(warmup):
                loss = self._train_epoch(train_data, epoch, show_progress=show_progress)
                self.logger.info(set_color(f"alignment phase A (warm-up) epoch {epoch}", "green") + f": loss {loss}")
            self._loader_start = loader_state(train_data)
        else:
            self._loader_start = resumed["loader_start"]
        self.llm, self.tokenizer = build_lora_llm(self.config, device=self.device)
        if resumed is not None and resumed["phase"] == "C":
            self._restore_alignment_state(resumed)
            restore_random_state(resumed["random"], train_data)
        else:
            self.alignment_steps(train_data, dataset, show_progress=show_progress, resumed=resumed)
            if self._write_alignment_state:
                self._save_alignment_state("C", self._planned_steps(train_data), train_data)
        self.regenerate_knowledge(dataset, show_progress=show_progress)
        self.aligned = True

    def _planned_steps(self, train_data):
        steps = config_get(self.config, "alignment_steps")
        if steps is not None:
            return int(steps)
        return int(seralm_get(self.config, "alignment_epochs")) * len(train_data)

    def make_generator(self, dataset, frozen_base):
        options = generator_options(self.config)
        options["grounding"] = knowledge.grounding_prefixes(dataset, self.config)
        prompts = item_prompts(dataset, self.config, self.tokenizer)
        encode = KnowledgeEncoder(self.config, device=self.device)
        if self.generator_mode == "ray":
            # ~ = share the trainer's GPU: Ray hides GPUs from an actor that reserves none, which would then
            # sample on the CPU.
            gpus = config_get(self.config, "generator_num_gpus")
            if gpus is None:
                gpus = 0.5 if self.device.type == "cuda" else 0
            return RayGenerator(self.config, prompts, self.model, frozen_base, encode, options, self.refresh_every,
                                ray_address=config_get(self.config, "ray_address"),
                                num_cpus=int(seralm_get(self.config, "generator_num_cpus")), num_gpus=gpus,
                                prefetch=int(seralm_get(self.config, "generator_prefetch")),
                                dtype=self.llm.get_input_embeddings().weight.dtype)
        return SyncGenerator(self.llm, self.tokenizer, prompts, self.model, frozen_base, encode, options,
                             self.refresh_every)

    def snapshot(self):
        """(LoRA state, recommender state) as CPU copies: what the trainer job sends the generator."""
        lora = lora_state(self.llm)
        rec_state = cpu_state(self.model.state_dict())
        self._last_snapshot = (lora, rec_state)
        return lora, rec_state

    def alignment_steps(self, train_data, dataset, show_progress=False, resumed=None):
        """Phase B: Algorithm 1 over ``alignment_epochs`` passes (or ``alignment_steps`` steps); ``resumed``:
        the state of an interrupted phase B, continued from its step."""
        total = self._planned_steps(train_data)
        if total <= 0:
            return
        frozen_base = load_frozen_base(self.config, dataset)
        params = [p for p in self.llm.parameters() if p.requires_grad]
        llm_optimizer = torch.optim.AdamW(params, lr=float(seralm_get(self.config, "llm_learning_rate")),
                                          weight_decay=0.0)
        depth = 1 + (int(seralm_get(self.config, "generator_prefetch")) if self.generator_mode == "ray" else 0)
        seed = int(self.config["seed"])
        pending = deque()
        first = resumed["step"] if resumed is not None else 0
        submitted = first  # batch j is always sampled with seed + j, resumed or not
        batches = self._batches(train_data, total)
        generator = self.make_generator(dataset, frozen_base)
        if resumed is not None:
            self._restore_alignment_state(resumed, llm_optimizer)
            replay_loader(train_data, self._loader_start, batches, first)
            generator.refresh_steps = list(resumed["refresh_steps"])
            if resumed["snapshot"] is not None:
                snap = resumed["snapshot"]
                self._last_snapshot = (snap["lora"], snap["rec_state"])
                generator.refresh(snap["lora"], snap["rec_state"], snap["step"])
            restore_random_state(resumed["random"], train_data)  # last: the set-up above draws random numbers
        self.generator_refresh_steps = generator.refresh_steps
        try:
            with tqdm(total=total, initial=first, desc="Alignment (Algorithm 1)", disable=not show_progress) as bar:
                for step in range(first, total):
                    if self._write_alignment_state and self._is_resume_point(step, first, resumed):
                        self._save_alignment_state("B", step, train_data, llm_optimizer, generator)
                    generator.maybe_refresh(step, self.snapshot)
                    while len(pending) < depth:
                        interaction = next(batches, None)
                        if interaction is None:
                            break
                        pending.append(interaction)
                        generator.submit(interaction, seed + submitted)  # reproducible sampling per batch
                        submitted += 1
                    if not pending:
                        break
                    interaction = pending.popleft()
                    kill_point("align_step")
                    start = time.perf_counter()
                    sample = generator.next()
                    waited = time.perf_counter() - start
                    record = self.alignment_step(interaction, sample, llm_optimizer)
                    record.update(step=step, generator_wait_s=waited, step_s=time.perf_counter() - start)
                    self.alignment_log.append(record)
                    bar.update(1)
                    if step % max(1, int(seralm_get(self.config, "align_log_every"))) == 0 or step == total - 1:
                        self.logger.info(set_color(f"alignment step {step}/{total}", "green") + ": " + ", ".join(
                            f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))
        finally:
            generator.close()

    def _batches(self, train_data, total):
        """Training batches, cycling over epochs until ``total`` have been produced; cut to their first
        ``align_batch_size`` rows when set (every row costs one sampled text on CPU)."""
        rows = config_get(self.config, "align_batch_size")
        if rows is not None and int(rows) < 1:
            raise ValueError(f"align_batch_size must be a positive integer or ~, got {rows!r}.")
        produced = 0
        epoch = 0
        while produced < total:
            for interaction in train_data:
                yield interaction if rows is None else interaction[: int(rows)]
                produced += 1
                if produced >= total:
                    return
            epoch += 1

    def alignment_step(self, interaction, sample, llm_optimizer):
        """Lines 5-6 of Algorithm 1 for one batch and its generator sample; returns logged numbers."""
        interaction = interaction.to(self.device)
        # Line 5 / Eq. 9: the recommender maximises log p(y|x,s) with each instance's own sampled knowledge as
        # input; rows that sampled the same items share one pass, weighted so the sum is the batch mean.
        self.model.train()
        self.optimizer.zero_grad()
        if getattr(self.model, "train_text_encoder", False):
            # The encoder is part of theta_r: s and the batch's other items are encoded by it, with gradients, once
            # per step (every group below indexes the same tables).
            base = self.model.fresh_knowledge_table(interaction)
            vectors = self.model.encode_knowledge_texts(sample["texts"])
        else:
            base, vectors = None, sample["knowledge"].to(self.device)
        by_item = {item: vectors[u] for u, item in enumerate(sample["items"])}
        instance_items = instance_items_from(sample["membership"], sample["items"])
        rec_loss = 0.0
        for rows, override in by_sampled_items(instance_items, by_item, self.device):
            table = self.model.override_table(override, base=base)
            loss = self.model.calculate_loss(interaction[rows], knowledge_override=table)
            if isinstance(loss, tuple):
                loss = sum(loss)
            rec_loss = rec_loss + loss * (len(rows) / len(instance_items))
        self._check_nan(rec_loss)
        rec_loss.backward()
        if self.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
        self.optimizer.step()

        # Line 6 / Eq. 8: the LLM's weighted log-likelihood of s plus the per-token KL penalty.
        self.llm.train()
        token_logps = sequence_logprobs(self.llm, sample["prompt_ids"], sample["gen_ids"],
                                        batch_size=int(seralm_get(self.config, "align_generation_batch_size")),
                                        pad_token_id=self.tokenizer.pad_token_id)
        weights = importance_weights(sample["logp_rec_s"], sample["logp_rec_base"], self.ratio_clip)
        llm_loss, stats = alignment_llm_loss(token_logps, sample["orig_token_logps"], weights,
                                             sample["membership"], self.alpha, self.kl_estimator, self.baseline)
        llm_optimizer.zero_grad()
        llm_loss.backward()
        llm_optimizer.step()
        self.llm.eval()
        stats.update(rec_loss=float(rec_loss.detach()), llm_loss=float(llm_loss.detach()),
                     texts=len(sample["items"]), instances=int(sample["membership"].size(0)),
                     snapshot_step=sample["snapshot_step"])
        return stats

    def regenerate_knowledge(self, dataset, show_progress=False):
        """Phase C: every item's knowledge from the aligned LLM, re-encoded; replaces the model's matrix."""
        state = lora_state(self.llm)
        self.adapter_version = "lora-" + state_digest(state)
        self.llm.eval()
        texts = knowledge.generate_knowledge(dataset, self.config, llm=self.llm, tokenizer=self.tokenizer,
                                             adapter_version=self.adapter_version, progress=show_progress, lora=state)
        texts = knowledge.grounded_texts(dataset, self.config, texts)
        if getattr(self.model, "train_text_encoder", False):
            self.model.set_knowledge_texts(texts)  # encoded by the model's own, jointly trained encoder
        else:
            self.model.set_knowledge_vectors(knowledge.encode_knowledge(texts, self.config, progress=show_progress))
        self.logger.info(set_color("alignment phase C", "green")
                         + f": knowledge regenerated with adapter {self.adapter_version}")

    # ------------------------------------------------------------------------ alignment resume
    def _is_resume_point(self, step, first, resumed):
        if step == first:  # step 0 of a new phase B keeps the warm-up; a resumed step is already saved
            return resumed is None
        return self.align_resume_every > 0 and step % self.align_resume_every == 0

    def _save_alignment_state(self, phase, step, train_data, llm_optimizer=None, generator=None):
        """Everything an exact continuation of phase ``phase`` at ``step`` needs (see alignment_resume)."""
        snapshot = None
        if self._last_snapshot is not None and generator is not None and generator.refresh_steps:
            lora, rec_state = self._last_snapshot
            snapshot = {"lora": lora, "rec_state": rec_state, "step": generator.refresh_steps[-1]}
        atomic_torch_save({
            "fingerprint": run_fingerprint(self.config),
            "phase": phase,
            "step": step,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lora": lora_state(self.llm),
            "llm_optimizer": llm_optimizer.state_dict() if llm_optimizer is not None else None,
            "snapshot": snapshot,
            "refresh_steps": list(generator.refresh_steps) if generator is not None else [],
            "loader_start": self._loader_start,
            "random": capture_random_state(train_data),  # with the loader's: phase C resumes after B's passes
            "alignment_log": list(self.alignment_log),
        }, self.alignment_state_file)

    def _restore_alignment_state(self, state, llm_optimizer=None):
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        load_lora_state(self.llm, state["lora"])
        if llm_optimizer is not None and state["llm_optimizer"] is not None:
            llm_optimizer.load_state_dict(state["llm_optimizer"])
        self.alignment_log = list(state["alignment_log"])

    def resume_interrupted_run(self):
        """Continue the training after alignment (ordinary resume state), else an interrupted alignment."""
        if os.path.isfile(self.resume_state_file) or not self.alignment \
                or not os.path.isfile(self.alignment_state_file):
            return super().resume_interrupted_run()
        path = self.alignment_state_file
        state = load_checkpoint(path, map_location="cpu")
        if state.get("fingerprint") != run_fingerprint(self.config):
            raise RuntimeError(f"Alignment resume state '{path}' was written for a different config; delete it "
                               "to start over.")
        self._alignment_resume = state
        where = f"phase B at step {state['step']}" if state["phase"] == "B" else "phase C (knowledge regeneration)"
        self.logger.info(f"Resuming the interrupted alignment in {where} ({path})")
        return True

    def warn_if_interrupted_run(self):
        super().warn_if_interrupted_run()
        if self.alignment and os.path.isfile(self.alignment_state_file):
            self.logger.warning(f"An interrupted alignment with this config left {self.alignment_state_file}; "
                                "this run starts over (pass --resume=True to continue it instead)")

    # ---------------------------------------------------------------------------- checkpoints
    def _checkpoint_state(self, epoch):
        state = super()._checkpoint_state(epoch)
        state["lora_adapter_version"] = self.adapter_version
        return state

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        saved_model_file = kwargs.get("saved_model_file", self.saved_model_file)
        super()._save_checkpoint(epoch, verbose=verbose, **kwargs)
        if self.llm is not None and (self.config["single_spec"] or self.config["local_rank"] == 0):
            save_adapter(lora_state(self.llm), adapter_path(saved_model_file), self.adapter_version or "")

    def _resume_extra(self):
        return {"adapter_version": self.adapter_version}

    def _load_resume_extra(self, extra):
        # The resume state is written only by the training after alignment; its state_dict holds the
        # aligned knowledge matrix, so alignment is not run again.
        if extra and extra.get("adapter_version"):
            self.adapter_version = extra["adapter_version"]
            self.aligned = True

    def resume_checkpoint(self, resume_file):
        """RecBole resume; a checkpoint written after alignment (it records the adapter version) holds the
        aligned knowledge matrix in its state_dict, so alignment is not run again."""
        super().resume_checkpoint(resume_file)
        checkpoint = self._load_checkpoint_file(resume_file)
        if checkpoint.get("lora_adapter_version"):
            self.adapter_version = checkpoint["lora_adapter_version"]
            self.aligned = True
