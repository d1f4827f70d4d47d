r"""Laser: Parameter-Efficient LLM Bi-Tuning for Sequential Recommendation with Collaborative Information.

Zhang et al., 2024. A frozen decoder LLM reads ``[P ; text ; s]``: the prefix P (L tokens from M-Former over the
frozen SR's states C_u), the user's history as text (paper 3.1.1 template) and one trainable suffix vector s.
The LLM's last hidden state at s is the user embedding h_u; an item is a one-item history and gives h_i the
same way. Score = cos(h_u, h_i); loss = IIC (softmax over all items, temperature tau) + lambda * L_LB.

Choices where the paper is silent:
- Text is assembled from pre-tokenised pieces (instruction, ``"\n>> k."`` markers, each item's text) instead of
  tokenising the whole string per batch; BPE merges across piece boundaries can differ slightly from
  tokenising the full string, nothing else changes.
- IIC scores h_u against the item matrix of the current epoch start (no grad), as the paper trains "on I";
  ``iic_positive_grad: True`` additionally re-encodes the positive item with grad (its logit replaced).
  Every evaluation and checkpoint pairs weights with the matrix those weights make: stage 1 recomputes it for
  validation; stage 2 (paper 3.3.2: the user side adapts "to the fixed embeddings") freezes a copy of the item
  side (prefix module + suffix) with its matrix, saved as ``item_tower.*``.
- ``sampled_negatives: n`` replaces IIC by a softmax over the batch's positives and n random items, all encoded
  with grad (the released code's phase before its refresh stage). ``score_centering: item_mean`` takes the
  cosine after subtracting the item matrix mean (the truncated LLM's embeddings are nearly parallel);
  ``score_centering: whiten`` also divides each principal axis of the centred item matrix by its scale (soft
  whitening, ``whitening_eps``), so a few dominant directions no longer decide every cosine;
  ``sr_user_state: predictive`` / ``sr_item_state: embedding`` / ``prefix_init`` give M-Former the SR's
  predictive state, its item embeddings and a prefix on the scale of the LLM's tokens. All off by default (the
  paper's setting); what each did on the CPU: ``benchmarks/results/rerun-2026-12-02/``.
- The suffix is drawn at random (paper 4.1.2: "The other trainable modules are all randomly initialized"), from
  N(0, sigma^2) with sigma the std of the LLM's token embeddings, so it starts on the scale of a real token;
  ``suffix_init: eos`` starts it from the [EOS] embedding instead.
- ``item_bias: True`` (not in the paper, whose score is the cosine alone) adds a trainable per-item logit b_i,
  zero at the start, so the untrained model ranks as without it: score = cos(h_u, h_i) / tau + b_i in the loss,
  cos + tau * b_i in ``predict`` / ``full_sort_predict`` (the same ranking). It is read live, never cached with
  the item matrix, and trains in both stages at ``item_bias_learning_rate``; a cosine of unit vectors made by
  shared weights cannot express how often an item is bought. Not carried over by ``init_checkpoint`` (its
  items are another dataset's).
  ``item_bias_init: log_popularity`` starts b_i at the log of the item's training count instead (the prior of
  logit adjustment: the untrained model then ranks as Pop, with the cosine deciding among items of like count).
- ``temperature_learning_rate`` (not in the paper, whose tau is fixed) learns tau as CLIP learns its logit scale: a
  fixed tau made the softmax of a truncated LLM's cosines worse than uniform, and the first training steps then went
  into flattening the cosines rather than ranking with them.
- ``user_centering: user_mean`` centres user vectors by the mean embedding of a fixed sample of training sequences
  (made with the weights scored) instead of the item mean: a user's text (a history) and an item's (one line) have
  different means, and the difference, shared by every user, points all of them at the same few items.
- "w/o M-Former" (Table 4) keeps L prefix tokens but gives them no ID-based information: they are learned free
  vectors (plain prefix tuning), our reading of "the importance of using ID-based collaborative information".
  ``no_mformer_prefix: linear`` maps the SR's user state linearly instead (the CoLLM-style projection the paper
  argues against).
- The LLM's backbone must take ``inputs_embeds`` in [batch, seq, hidden] (transformers-native decoders); remote
  code models such as ChatGLM2, which the paper used, need input_ids and a [seq, batch] layout, so they are
  refused with a clear error rather than misread.
- Padding item 0 is excluded from the IIC softmax (it is not an item).
- The LLM and the frozen SR are left out of ``state_dict()`` (they are never trained); a reload rebuilds
  them from ``llm_path`` and the SR checkpoint/cache.
"""

import copy
import logging
import math
import os

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType, set_color
from torch import nn
from tqdm.auto import tqdm

from recbole_llm.core.checkpoint import load_checkpoint
from recbole_llm.core.config import apply_plugin_defaults
from recbole_llm.core.keys import trusts_pickled_code
from recbole_llm.core.errors import ConfigError, DataNotFoundError
from recbole_llm.core.faults import kill_point
from recbole_llm.core.validation import NON_NEGATIVE, POSITIVE, POSITIVE_INT, check_model_config, check_softmax_training
from recbole_llm.laser.frozen_sr import SUPPORTED_SR, build_frozen_sr
from recbole_llm.laser.mformer import ROUTER_GRADIENTS, LearnedPrefix, LinearPrefix, MFormer
from recbole_llm.llm.encode import hidden_states_from_embeds, last_hidden_from_embeds
from recbole_llm.llm.item_text import item_texts
from recbole_llm.llm.loader import hidden_size, input_embeddings, load_causal_lm
from recbole_llm.llm.workers import WorkerPool, set_worker_threads, worker_settings

USER_INSTRUCTION = ("You are an intelligent recommendation assistant. Please summarize the user's characteristics "
                    "into a single token based on the browsing history. In chronological order, the user has "
                    "browsed the following items:")
ITEM_INSTRUCTION = ("You are an intelligent recommendation assistant. Please summarize the item characteristics "
                    "into a single token:")
# Paper Table 6: the unified template and its three variants.
TEMPLATES = {
    "default": (USER_INSTRUCTION, USER_INSTRUCTION),
    "no_single_token": (USER_INSTRUCTION.replace(" into a single token", ""),) * 2,
    "no_instruction": ("", ""),
    "item_instruction": (USER_INSTRUCTION, ITEM_INSTRUCTION),
}
SUFFIX_INITS = ("random", "eos")
NO_MFORMER_PREFIXES = ("learned", "linear")
POOLINGS = ("suffix", "mean", "eos")
SCORE_CENTERINGS = ("none", "item_mean", "whiten")
USER_CENTERINGS = ("item_mean", "user_mean")
ITEM_BIAS_INITS = ("zero", "log_popularity")
SR_USER_STATES = ("positions", "predictive")
SR_ITEM_STATES = ("history", "embedding")
PREFIX_INITS = ("default", "token_scale", "zero")
FROZEN_PREFIXES = ("llm.", "frozen_sr.")

logger = logging.getLogger(__name__)


def leading_special_ids(tokenizer):
    """The ids a tokenizer puts before any text by itself, found by tokenising with and without special tokens.
    Trailing ones (BERT's [SEP]) are left out: the suffix s ends Laser's input."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def truncate_keeping_apart(token_lists, max_tokens, step=4):
    """Each token list cut to ``max_tokens``, except that lists whose cut would equal another's (and whose full texts
    differ) keep ``step`` more tokens at a time until they differ or are whole: a cap short enough for a CPU budget
    must not make different items the same text (they would tie in every ranking)."""
    caps = [max_tokens] * len(token_lists)
    while True:
        groups = {}
        for index, ids in enumerate(token_lists):
            groups.setdefault(tuple(ids[:caps[index]]), []).append(index)
        grown = False
        for members in groups.values():
            if len(members) < 2 or len({tuple(token_lists[i]) for i in members}) < 2:
                continue  # alone, or the same full text: nothing tells them apart
            for index in members:
                if caps[index] < len(token_lists[index]):
                    caps[index] += step
                    grown = True
        if not grown:
            return [ids[:cap] for ids, cap in zip(token_lists, caps)]


def split_epochs(epochs, stage1, stage2):
    """(stage-1, stage-2) epochs for an explicit ``epochs`` total: stage 2 gets floor(epochs * stage2 / (stage1 +
    stage2)), stage 1 the rest and at least one epoch when it runs at all (paper 15+5: epochs=1 gives 1+0, epochs=4
    gives 3+1, epochs=40 gives 30+10); a skipped stage (0) gets none."""
    if stage1 + stage2 == 0:
        return 0, 0
    second = int(epochs * stage2 / (stage1 + stage2))  # floor: the remainder goes to stage 1
    if stage1 > 0 and epochs > 0 and second == epochs:
        second = epochs - 1
    return epochs - second, second


def stage_epochs(config):
    """(stage-1 epochs, stage-2 epochs) that LaserTrainer runs: a skipped stage has none."""
    return (0 if config["skip_stage1"] else int(config["stage1_epochs"]),
            0 if config["skip_stage2"] else int(config["stage2_epochs"]))


class Laser(SequentialRecommender):
    input_type = InputType.POINTWISE

    # the switches and ranges of Laser's keys (recbole_llm.core.validation reads these)
    CHOICES = {
        "pooling": POOLINGS,
        "template": tuple(TEMPLATES),
        "suffix_init": SUFFIX_INITS,
        "no_mformer_prefix": NO_MFORMER_PREFIXES,
        "score_centering": SCORE_CENTERINGS,
        "user_centering": USER_CENTERINGS,
        "item_bias_init": ITEM_BIAS_INITS,
        "sr_user_state": SR_USER_STATES,
        "sr_item_state": SR_ITEM_STATES,
        "prefix_init": PREFIX_INITS,
        "router_gradient": ROUTER_GRADIENTS,
        "frozen_sr_model": SUPPORTED_SR,
    }
    RANGES = {
        "n_experts": POSITIVE_INT,
        "n_query_tokens": POSITIVE_INT,
        "mformer_hidden_size": POSITIVE_INT,
        "mformer_n_layers": POSITIVE_INT,
        "mformer_n_heads": POSITIVE_INT,
        "temperature": POSITIVE,
        "lb_weight": NON_NEGATIVE,
        "stage1_epochs": NON_NEGATIVE,
        "stage2_epochs": NON_NEGATIVE,
        "train_samples_per_epoch": POSITIVE_INT,
        "sampled_negatives": NON_NEGATIVE,
        "prefix_learning_rate": POSITIVE,
        "whitening_eps": POSITIVE,
        "item_bias_learning_rate": POSITIVE,
        "user_center_samples": POSITIVE_INT,
        "temperature_learning_rate": POSITIVE,
    }

    @classmethod
    def run_inputs(cls, config):
        """What a run loads besides the atomic files (checked by recbole_llm.run.preflight before anything is
        written)."""
        return {"item_text", "llm"}

    @classmethod
    def settle_config(cls, config):
        """Make ``epochs`` and the two stages agree. Without an explicit ``epochs`` it becomes stage1_epochs +
        stage2_epochs (a skipped stage counts 0), the epochs LaserTrainer runs. An explicit ``epochs`` (RecBole's
        model tests, run_hyper, users' scripts set it for every model) is split over the stages instead, see
        :func:`split_epochs`, and the stage keys are set to the result; the config dump shows both."""
        asked = (getattr(config, "external_config_dict", None) or {}).get("epochs")
        if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 0):
            raise ConfigError(f"epochs={asked!r} cannot be split over Laser's two stages: expected an integer >= 0 "
                              "(0 only evaluates: the untrained model, or an init_checkpoint).")
        stage1, stage2 = stage_epochs(config)
        if asked is not None and asked != stage1 + stage2:
            stage1, stage2 = split_epochs(asked, stage1, stage2)
            if not config["skip_stage1"]:
                config["stage1_epochs"] = stage1
            if not config["skip_stage2"]:
                config["stage2_epochs"] = stage2
            logger.info(f"Laser: epochs={asked} split over the stages as stage1_epochs={stage1}, "
                        f"stage2_epochs={stage2} (in the ratio of the configured stages, stage 1 first)")
        config["epochs"] = stage1 + stage2

    def __init__(self, config, dataset):
        apply_plugin_defaults(config, "Laser")  # stock RecBole Config does not know the plugin YAML
        check_softmax_training(config, "Laser")  # IIC is a softmax over all items
        self.settle_config(config)  # the plugin Config did this already; RecBole's own has not
        super().__init__(config, dataset)
        self.temperature = config["temperature"]
        self.lb_weight = config["lb_weight"]
        self.pooling = config["pooling"]
        self.use_prefix = config["use_prefix"]
        self.iic_positive_grad = config["iic_positive_grad"]
        self.encode_batch_size = config["encode_batch_size"]
        # `or`: the config of a checkpoint saved before these switches existed lacks them (None); it ran as the
        # value after `or` (the defaults themselves are in Laser.yaml)
        self.score_centering = config["score_centering"] or "none"
        self.user_centering = config["user_centering"] or "item_mean"
        self.remove_shared_user_gradient = bool(config["remove_shared_user_gradient"])
        self.sr_user_state = config["sr_user_state"] or "positions"
        self.sr_item_state = config["sr_item_state"] or "history"
        self.sampled_negatives = config["sampled_negatives"] or 0
        self.whitening_eps = config["whitening_eps"]
        self.prefix_learning_rate = config["prefix_learning_rate"]
        self.item_bias_learning_rate = config["item_bias_learning_rate"]
        check_model_config(config, type(self))  # again here: a config built by stock RecBole's Config
        if config["init_checkpoint"] and not os.path.isfile(config["init_checkpoint"]):  # before any slow set-up
            raise DataNotFoundError(f"init_checkpoint '{config['init_checkpoint']}' does not exist; expected a Laser "
                                    "checkpoint such as saved/Laser-<time>.pth.")

        # frozen parts
        self.llm, self.tokenizer = load_causal_lm(config["llm_path"], device=self.device, dtype=config["llm_dtype"],
                                                  num_layers=config["llm_num_layers"],
                                                  trust_remote_code=config["llm_trust_remote_code"])
        _require_native_backbone(self.llm, config["llm_path"])
        self.llm_size = hidden_size(self.llm)
        self.llm_dtype = next(self.llm.parameters()).dtype
        self.frozen_sr = build_frozen_sr(config, dataset).to(self.device)  # its weights: see LaserTrainer.prepare_side_models

        # trainable parts: prefix generator and suffix
        token_table = input_embeddings(self.llm).weight.detach()
        token_std = float(token_table.float().std())
        self.prefix_module = self._build_prefix_module(config, token_std) if self.use_prefix else None
        if self.prefix_module is not None and isinstance(self.prefix_module, MFormer):
            self.prefix_module.init_projection(config["prefix_init"] or "default", token_std)
        eos = self.tokenizer.eos_token_id
        self.register_buffer("eos_ids", torch.tensor([eos], dtype=torch.long), persistent=False)
        if self.pooling == "suffix":
            if config["suffix_init"] == "eos":
                start = token_table[eos].float().clone()
            else:
                start = torch.randn(self.llm_size, device=token_table.device) * token_std
            self.suffix = nn.Parameter(start)

        # per-item logit (None = the paper's cosine alone): zero at the start, so untrained scores are the
        # cosine's, or the log of the item's training count (a popularity prior on the logit scale)
        self.item_bias = nn.Parameter(self._initial_item_bias(config, dataset)) if config["item_bias"] else None
        # log(1 / tau), learned (CLIP's logit scale) when temperature_learning_rate is set; None = tau fixed (paper)
        self.temperature_learning_rate = config["temperature_learning_rate"]
        self.log_inv_tau = nn.Parameter(torch.tensor(math.log(1.0 / self.temperature))) \
            if self.temperature_learning_rate else None

        self._tokenise_pieces(config, dataset)
        self._pick_center_users(config, dataset)

        # item matrix of the current stage (rows L2-normalised; row 0 = padding), cached between refreshes
        self.item_tower = None  # the frozen item side of stage 2 (see freeze_item_side)
        self.item_matrix = None
        self.item_center = None
        self.item_whitening = None  # [d, d] with score_centering: whiten, made with the matrix and kept with it
        self.user_center = None  # with user_centering: user_mean, the sample users' mean embedding
        self.user_center_version = -1
        self.item_matrix_version = -1
        self.param_version = 0  # bumped by the trainer after every optimizer step
        self.training_stage = 1
        self.other_parameter_name = ["item_matrix", "item_center", "item_whitening", "item_matrix_version",
                                     "user_center", "user_center_version", "param_version", "training_stage"]
        workers = worker_settings(config)
        self._worker_args = (config, dataset, workers) if workers[0] > 1 else None  # item refresh on Ray actors
        self._item_workers = None
        if config["init_checkpoint"]:
            self.load_trainable_weights(config["init_checkpoint"],
                                        trust=trusts_pickled_code(config))
        self._log_parameter_counts()

    # ------------------------------------------------------------------------------------------ building
    def _initial_item_bias(self, config, dataset):
        """b_i at the start: zeros, or with ``item_bias_init: log_popularity`` log(1 + n_i) minus its mean over
        the items, n_i the item's count as a target in ``dataset`` (the training split RecBole builds the model
        with, so no validation or test interaction is read); padding item 0 stays 0."""
        bias = torch.zeros(self.n_items)
        if (config["item_bias_init"] or "zero") == "log_popularity":
            targets = torch.as_tensor(dataset.inter_feat[self.ITEM_ID]).long()
            counts = torch.bincount(targets, minlength=self.n_items)[:self.n_items].float()
            prior = torch.log1p(counts[1:])
            bias[1:] = prior - prior.mean()
        return bias

    def _build_prefix_module(self, config, token_std):
        collab_size = self.frozen_sr.hidden_size
        if not config["use_mformer"]:
            if config["no_mformer_prefix"] == "linear":
                return LinearPrefix(collab_size, self.llm_size, config["n_query_tokens"])
            return LearnedPrefix(self.llm_size, config["n_query_tokens"], init_std=token_std)
        return MFormer(
            collab_size, self.llm_size,
            n_experts=config["n_experts"] if config["use_moe"] else 1,
            n_query_tokens=config["n_query_tokens"], hidden_size=config["mformer_hidden_size"],
            n_layers=config["mformer_n_layers"], n_heads=config["mformer_n_heads"],
            inner_size=config["mformer_inner_size"], dropout=config["mformer_dropout"],
            router_gradient=config["router_gradient"], router_bias=bool(config["router_bias"]),
        )

    def parameter_groups(self, learning_rate):
        """The trainable parameters as optimizer groups: the prefix generator at ``prefix_learning_rate`` (when
        set), the item bias at ``item_bias_learning_rate`` (when on), everything else (the suffix) at
        ``learning_rate``. Adam moves every weight by about the learning rate per step whatever its gradient, so
        M-Former's output projection (d_m inputs per prefix entry) moves the prefix much faster than the same rate
        moves the suffix or a learned prefix token; a logit bias needs steps on the logit's scale instead. With one
        rate and no bias: one group in parameter order, as before the switches, so optimizer states saved then
        still load on resume."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        prefix_lr = self.prefix_learning_rate or learning_rate
        if self.item_bias is None and self.log_inv_tau is None and (prefix_lr == learning_rate
                                                                    or self.prefix_module is None):
            return [{"params": trainable, "lr": learning_rate}]
        prefix = {id(p) for p in self.prefix_module.parameters()} if self.prefix_module is not None else set()
        bias = {id(self.item_bias)} if self.item_bias is not None else set()
        scale = {id(self.log_inv_tau)} if self.log_inv_tau is not None else set()
        groups = ({"params": [p for p in trainable if id(p) not in prefix | bias | scale], "lr": learning_rate},
                  {"params": [p for p in trainable if id(p) in prefix], "lr": prefix_lr},
                  {"params": [p for p in trainable if id(p) in bias], "lr": self.item_bias_learning_rate},
                  {"params": [p for p in trainable if id(p) in scale], "lr": self.temperature_learning_rate})
        return [group for group in groups if group["params"]]

    def _ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _tokenise_pieces(self, config, dataset):
        """Token ids of every template piece and every item text, once."""
        user_instruction, item_instruction = TEMPLATES[config["template"]]
        # T_u tokenised as the LLM normally sees a text: with what its tokenizer puts first (Llama-2: <s>; the
        # bundled SmolLM2: nothing), after the prefix as in [P; T_u; s].
        lead = leading_special_ids(self.tokenizer) if config["add_special_tokens"] else []
        self.user_head_ids = lead + self._ids(user_instruction)
        self.item_head_ids = lead + self._ids(item_instruction)
        self.marker_ids = [self._ids(f"\n>> {k}.") for k in range(1, self.max_seq_length + 1)]
        texts = item_texts(dataset, config)
        if len(texts) != self.n_items:
            raise ValueError(f"item_texts gave {len(texts)} texts for {self.n_items} items of '{config['dataset']}'")
        max_tokens = config["item_text_max_tokens"]
        encoded = self.tokenizer([" " + t for t in texts[1:]], add_special_tokens=False)["input_ids"]
        if max_tokens:
            encoded = truncate_keeping_apart(encoded, max_tokens) if config["item_text_unique"] else \
                [ids[:max_tokens] for ids in encoded]
        self.item_text_ids = [[]] + encoded

    def _pick_center_users(self, config, dataset):
        """With ``user_centering: user_mean``: a fixed sample of the training sequences (drawn with the run's seed)
        whose mean embedding centres every user vector, recomputed whenever the item matrix is."""
        self.register_buffer("center_seq", None, persistent=False)
        self.register_buffer("center_len", None, persistent=False)
        if self.user_centering != "user_mean":
            return
        if self.score_centering == "none":
            raise ConfigError("user_centering: user_mean centres user vectors before the cosine, so it needs "
                              "score_centering: item_mean or whiten; with score_centering: none (the paper's plain "
                              "cosine) set user_centering: item_mean.")
        sequences = dataset.inter_feat[self.ITEM_SEQ]
        generator = torch.Generator().manual_seed(int(config["seed"] or 0))
        count = min(int(config["user_center_samples"]), len(sequences))
        rows = torch.randperm(len(sequences), generator=generator)[:count]
        self.register_buffer("center_seq", sequences[rows].clone(), persistent=False)
        self.register_buffer("center_len", dataset.inter_feat[self.ITEM_SEQ_LEN][rows].clone(), persistent=False)

    def _log_parameter_counts(self):
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        llm = sum(p.numel() for p in self.llm.parameters())
        logger.info(set_color("Laser parameters", "blue") + f": trainable {trainable:,} "
                    f"({100.0 * trainable / max(total, 1):.3f}% of {total:,} total; frozen LLM {llm:,}, "
                    f"frozen SR {sum(p.numel() for p in self.frozen_sr.parameters()):,})")

    # ----------------------------------------------------------------------------------- frozen-part care
    def train(self, mode=True):
        super().train(mode)
        self.llm.eval()  # frozen: never in training mode
        if self.item_tower is not None:
            self.item_tower.eval()  # fixed: no dropout, as when it made the item matrix
        return self

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict=True, assign=False):
        # A stage-2 state carries the frozen item side that made its item matrix; other states have none.
        if any(key.startswith("item_tower.") for key in state_dict):
            if self.item_tower is None:
                self.freeze_item_side()
        else:
            self.unfreeze_item_side()
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(FROZEN_PREFIXES)]
        if strict and (missing or result.unexpected_keys):
            if all(k.split(".")[-2:] == ["router", "bias"] for k in missing + result.unexpected_keys):
                saved = bool(result.unexpected_keys)
                raise RuntimeError(f"Laser.load_state_dict: the checkpoint has {'an' if saved else 'no'} M-Former "
                                   f"router bias and this Laser has {'one' if missing else 'none'}: set router_bias: "
                                   f"{saved} to load it (earlier versions of Laser had the bias; Eq. 5 has none)")
            raise RuntimeError(f"Laser.load_state_dict: missing keys {missing}, unexpected keys "
                               f"{result.unexpected_keys} (does the checkpoint match this config?)")
        # New weights: a cached item matrix no longer matches them (load_other_parameter, which follows in a
        # checkpoint reload, restores the matrix saved with these weights).
        self.param_version += 1
        return result

    def load_trainable_weights(self, path, trust=False):
        """Start from the prefix/suffix/M-Former weights of another Laser run (paper 4.3: Laser trained on one domain,
        then evaluated or fine-tuned on another). Nothing tied to that run's dataset is read: the frozen LLM and SR
        are this run's, and the item matrix is computed for this dataset's items."""
        checkpoint = load_checkpoint(path, map_location="cpu", trust_pickled_code=trust)
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise ConfigError(f"init_checkpoint '{path}' holds no 'state_dict'; expected a checkpoint saved by a "
                              "RecBole trainer.")
        state = {key: value for key, value in state.items() if key != "item_bias"}  # the other dataset's items
        if self.item_bias is not None:
            state["item_bias"] = self.item_bias.detach().clone()
        if self.log_inv_tau is None:
            state.pop("log_inv_tau", None)
        elif "log_inv_tau" not in state:  # the other run's tau was fixed: this one starts at its own
            state["log_inv_tau"] = self.log_inv_tau.detach().clone()
        try:
            self.load_state_dict(state)
        except RuntimeError as err:
            raise ConfigError(
                f"init_checkpoint '{path}' does not fit this Laser ({str(err).splitlines()[0]}); it must come from a "
                "Laser with the same LLM, frozen SR width and prefix settings (use_prefix, use_mformer, n_experts, "
                "n_query_tokens, M-Former sizes, router_bias, pooling).") from None
        logger.info(f"Laser: trainable weights loaded from init_checkpoint {path}")

    def mark_parameters_updated(self):
        """Called after each optimizer step: the cached item matrix is now stale."""
        self.param_version += 1

    # ----------------------------------------------------------------------------------------- encoding
    def user_token_ids(self, item_seq, item_seq_len):
        """Token ids of each user's text: instruction + ``>> k. <item text>`` lines, oldest first."""
        rows = []
        for seq, length in zip(item_seq.tolist(), item_seq_len.tolist()):
            ids = list(self.user_head_ids)
            for k in range(length):
                ids += self.marker_ids[k] + self.item_text_ids[seq[k]]
            rows.append(ids)
        return rows

    def item_token_ids(self, items):
        return [self.item_head_ids + self.marker_ids[0] + self.item_text_ids[i] for i in items.tolist()]

    def _inputs_embeds(self, token_ids, prefix, suffix=None):
        """Left-padded inputs_embeds [B, T, d] = [P ; text ; s] per row, and the attention mask [B, T].

        Built with a fixed number of scatters whatever B is (not a cat/pad per row): on a GPU the small LLM's
        refresh is launch-bound, and a per-row build cost about 250 of the ~2,500 ops of a batch of 32.
        """
        embed = input_embeddings(self.llm)
        if self.pooling == "suffix":
            tail = (self.suffix if suffix is None else suffix).to(self.llm_dtype)
        elif self.pooling == "eos":
            tail = embed(self.eos_ids)[0]
        else:
            tail = None
        n_rows, n_prefix, n_tail = len(token_ids), prefix.size(1) if prefix is not None else 0, int(tail is not None)
        text_len = torch.tensor([len(ids) for ids in token_ids]).unsqueeze(1)  # [B, 1]
        width = int(text_len.max()) + n_prefix + n_tail
        text_end = width - n_tail  # left padding: every row's text ends at the same column
        text_start = text_end - text_len
        first = text_start - n_prefix  # each row's first real position
        cols = torch.arange(width)

        def slots(where):  # [B, T] bool -> (rows, cols) in row-major order, i.e. the order of the flattened values
            return tuple(index.to(self.device) for index in where.nonzero(as_tuple=True))

        flat = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long, device=self.device)
        text = embed(flat)
        # out-of-place index_put keeps autograd to the prefix and the suffix
        embeds = text.new_zeros(n_rows, width, text.size(-1))
        embeds = embeds.index_put(slots((cols >= text_start) & (cols < text_end)), text)
        if prefix is not None:
            embeds = embeds.index_put(slots((cols >= first) & (cols < text_start)),
                                      prefix.to(self.llm_dtype).reshape(-1, text.size(-1)))
        if tail is not None:
            embeds = embeds.index_put(slots((cols == text_end).expand(n_rows, -1)), tail.expand(n_rows, -1))
        mask = (cols >= first).long().to(self.device)
        return embeds, mask

    def encode(self, token_ids, collab, collab_mask, tower=None):
        """h [B, d_llm] (float32) for texts ``token_ids`` with collaborative states C [B, N, d_i]; and L_LB.
        ``tower``: the frozen item side (its prefix module and suffix) instead of the trained ones."""
        prefix, lb_loss = None, torch.zeros((), device=self.device)
        prefix_module = self.prefix_module if tower is None else tower.prefix_module
        if prefix_module is not None:
            prefix, lb_loss, _ = prefix_module(collab, collab_mask)
        suffix = None if tower is None else tower.suffix
        embeds, mask = self._inputs_embeds(token_ids, prefix, suffix)
        if self.pooling == "mean":
            states = hidden_states_from_embeds(self.llm, embeds, mask).float()
            weights = mask.unsqueeze(-1).float()
            return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0), lb_loss
        return last_hidden_from_embeds(self.llm, embeds, mask).float(), lb_loss

    def forward(self, item_seq, item_seq_len):
        """User embeddings h_u [B, d_llm] and L_LB."""
        collab, collab_mask = self.frozen_sr(item_seq, item_seq_len, predictive=self.sr_user_state == "predictive")
        return self.encode(self.user_token_ids(item_seq, item_seq_len), collab, collab_mask)

    def encode_items(self, items):
        """Item embeddings h_i [B, d_llm]: each item as a one-item history (its own one-item C too)."""
        if self.sr_item_state == "embedding":
            collab, collab_mask = self.frozen_sr.item_states(items)
        else:
            collab, collab_mask = self.frozen_sr(items.unsqueeze(1), torch.ones_like(items))
        return self.encode(self.item_token_ids(items), collab, collab_mask, tower=self.item_tower)[0]

    def freeze_item_side(self):
        """Fix the item side at the current weights (paper 3.3.2, stage 2: Laser trains on "to further adapt to the
        fixed embeddings"): a frozen copy of the prefix module and the suffix encodes items from now on, so the
        fixed item matrix stays the one these weights make while the user side trains on. Saved in the state_dict
        (``item_tower.*``), so a checkpoint's matrix can always be recomputed from its own weights."""
        tower = nn.Module()
        tower.prefix_module = copy.deepcopy(self.prefix_module)
        tower.suffix = nn.Parameter(self.suffix.detach().clone()) if self.pooling == "suffix" else None
        tower.requires_grad_(False)
        tower.eval()
        self.item_tower = tower

    def unfreeze_item_side(self):
        self.item_tower = None

    @torch.no_grad()
    def refresh_item_matrix(self, force=False, show_progress=True):
        """Recompute every item's embedding with the current weights, unless nothing changed since the last
        refresh. Batched by text length (less padding); eval mode (no dropout). Returns True if recomputed."""
        if not force and self.item_matrix is not None and self.item_matrix_version == self.param_version:
            return False
        was_training = self.training
        self.eval()
        items = sorted(range(1, self.n_items), key=lambda i: len(self.item_text_ids[i]))
        matrix = torch.zeros(self.n_items, self.llm_size, device=self.device)
        batches = [items[i:i + self.encode_batch_size] for i in range(0, len(items), self.encode_batch_size)]
        with tqdm(total=len(batches), desc=set_color("Item embeddings", "pink"), disable=not show_progress,
                  ncols=100) as bar:
            def store(batch, rows):
                kill_point("item_refresh_batch")
                matrix[torch.tensor(batch, dtype=torch.long, device=self.device)] = rows.to(matrix)
                bar.update(1)

            if self._worker_args is not None:
                self._encode_on_workers(batches, store)
            else:
                for batch in batches:
                    store(batch, self.encode_items(torch.tensor(batch, dtype=torch.long, device=self.device)))
        center = matrix[1:].mean(0) if self.score_centering != "none" else torch.zeros_like(matrix[0])
        self.item_center = center
        self.item_whitening = whitening(matrix[1:] - center, self.whitening_eps) if self.score_centering == "whiten" \
            else None
        matrix[1:] = self.score_vectors(matrix[1:])
        self.item_matrix = matrix
        self.item_matrix_version = self.param_version
        self._refresh_user_center()
        self.train(was_training)
        return True

    @torch.no_grad()
    def _refresh_user_center(self):
        """The mean embedding of the sample users with the current weights (user_centering: user_mean), eval mode."""
        if self.center_seq is None:
            return
        was_training = self.training
        self.eval()
        self.user_center = self._raw_user_embeddings(self.center_seq, self.center_len).mean(0)
        self.user_center_version = self.param_version
        self.train(was_training)

    def _require_item_matrix(self):
        """The item matrix (computed if there is none) and, with user_centering: user_mean, a user centre made with
        the weights being scored: outside training it is recomputed once the user side has changed (stage 2, where
        the matrix stays fixed); while training it stays the one of the last refresh or evaluation, as the matrix."""
        if self.item_matrix is None:
            self.refresh_item_matrix(show_progress=False)
        if self.center_seq is not None and (self.user_center is None or (
                not self.training and self.user_center_version != self.param_version)):
            self._refresh_user_center()
        return self.item_matrix

    def _encode_on_workers(self, batches, store):
        """``encode_items`` of every batch on ``llm_workers`` Ray actors, each holding its own Laser (its own LLM
        and frozen SR, built from the config); this model's trainable weights travel once per refresh."""
        if self._item_workers is None:
            config, dataset, (n, cpus, gpus, address) = self._worker_args
            self._item_workers = WorkerPool(LaserItemWorker, (config, dataset, cpus), n, cpus, gpus, address)
        pool = self._item_workers
        state = pool.put({k: v.detach().cpu() for k, v in self.state_dict().items()})
        tasks = [(state, self.param_version, batch) for batch in batches]
        pool.run(tasks, "encode", lambda task, rows: store(task[2], rows))

    def close_item_workers(self):
        """Stop the refresh's Ray actors (a later refresh starts them again)."""
        if self._item_workers is not None:
            self._item_workers.close()
            self._item_workers = None

    # -------------------------------------------------------------------------------------- RecBole API
    def sampled_loss(self, interaction):
        """Both towers with gradient: each user against the batch's positives and ``sampled_negatives`` random
        items shared by the batch, all encoded now (the released code's phase before the refresh stage)."""
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        pos_items = interaction[self.POS_ITEM_ID]
        negatives = torch.randint(1, self.n_items, (max(self.sampled_negatives, 0),), device=self.device)
        candidates = torch.cat([pos_items, negatives])
        user, lb_loss = self.forward(item_seq, item_seq_len)
        items = self.encode_items(candidates)
        if self.score_centering == "whiten":  # a batch is far too few rows to whiten: the last item matrix's centre
            self._require_item_matrix()        # and transform (the pair it was fitted as), no grad
            user, items = self.score_vectors(user, users=True), self.score_vectors(items)
        else:
            center = items.mean(0, keepdim=True).detach() if self.score_centering == "item_mean" else 0.0
            user_center = user.mean(0, keepdim=True).detach() if self.center_seq is not None else center
            user = F.normalize(user - user_center, dim=-1)
            items = F.normalize(items - center, dim=-1)
        logits = self._add_item_bias(user @ items.t() / self.tau(), candidates)
        # a candidate equal to the row's positive (other than its own column) is not a negative
        same = candidates.unsqueeze(0) == pos_items.unsqueeze(1)
        own = torch.zeros_like(same)
        own[torch.arange(len(pos_items)), torch.arange(len(pos_items))] = True
        logits = logits.masked_fill(same & ~own, float("-inf"))
        target = torch.arange(len(pos_items), device=self.device)
        return F.cross_entropy(logits, target), self.lb_weight * lb_loss

    def calculate_loss(self, interaction):
        if self.sampled_negatives:
            return self.sampled_loss(interaction)
        item_seq = interaction[self.ITEM_SEQ]
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        pos_items = interaction[self.POS_ITEM_ID]
        item_matrix = self._require_item_matrix()
        user, lb_loss = self.forward(item_seq, item_seq_len)
        if self.remove_shared_user_gradient:
            # scores unchanged; the backward pass loses the part that moves the batch's users alike
            shift = user.mean(0, keepdim=True)
            user = user - (shift - shift.detach())
        user = self.score_vectors(user, users=True)
        logits = self._add_item_bias(user @ item_matrix.t() / self.tau())
        if self.iic_positive_grad:
            positive = self.score_vectors(self.encode_items(pos_items))
            fresh = self._add_item_bias((user * positive).sum(-1) / self.tau(), pos_items)
            logits = logits.scatter(1, pos_items.unsqueeze(1), fresh.unsqueeze(1))
        logits[:, 0] = float("-inf")  # padding is not an item
        iic_loss = F.cross_entropy(logits, pos_items)
        return iic_loss, self.lb_weight * lb_loss

    def _raw_user_embeddings(self, item_seq, item_seq_len):
        """h_u [B, d_llm] in chunks of encode_batch_size, before centring."""
        rows = []
        for start in range(0, item_seq.size(0), self.encode_batch_size):
            end = start + self.encode_batch_size
            rows.append(self.forward(item_seq[start:end], item_seq_len[start:end])[0])
        return torch.cat(rows)

    def _user_embeddings_chunked(self, item_seq, item_seq_len):
        return self.score_vectors(self._raw_user_embeddings(item_seq, item_seq_len), users=True)

    def score_vectors(self, embeddings, users=False):
        """Unit vectors the cosine is taken between: h - mu (the item matrix mean; for ``users`` with user_centering:
        user_mean, the sample users' mean) with score_centering, then times the item matrix's whitening transform
        with ``whiten``, else h."""
        center = self.user_center if users and self.center_seq is not None else self.item_center
        if center is not None:
            embeddings = embeddings - center
        if self.item_whitening is not None:
            embeddings = embeddings @ self.item_whitening
        return F.normalize(embeddings, dim=-1)

    def tau(self):
        """The IIC temperature: ``temperature``, or with temperature_learning_rate the learned one (kept >= 0.01, as
        CLIP caps its logit scale at 100)."""
        if self.log_inv_tau is None:
            return self.temperature
        return torch.exp(-self.log_inv_tau.clamp(max=math.log(100.0)))

    def _add_item_bias(self, logits, items=None):
        """Logits plus the bias of the item each entry of their last axis scores (``items``: those item ids, e.g. a
        batch's candidates or each row's positive; None = all items, the last axis is [n_items])."""
        if self.item_bias is None:
            return logits
        return logits + (self.item_bias if items is None else self.item_bias[items])

    def predict(self, interaction):
        matrix = self._require_item_matrix()
        user = self._user_embeddings_chunked(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        items = interaction[self.ITEM_ID]
        score = (user * matrix[items]).sum(-1)
        return score if self.item_bias is None else score + self.tau() * self.item_bias[items]

    def full_sort_predict(self, interaction):
        """Cosine of each user with every item of the cached item matrix (plus tau * b_i with ``item_bias``):
        [B, n_items], ranked as the training logits are."""
        matrix = self._require_item_matrix()
        user = self._user_embeddings_chunked(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        scores = user @ matrix.t()
        return scores if self.item_bias is None else scores + self.tau() * self.item_bias


def whitening(centred, eps):
    """[d, d] soft-whitening transform of the rows of ``centred`` [n, d] (the centred item matrix): each principal
    axis v_k of the rows is scaled by 1 / (s_k / s_max + eps), s_k its singular value, so the few axes that hold most
    of the variance of a truncated LLM's embeddings no longer decide every cosine (BERT-whitening, Su et al. 2021,
    with a floor that keeps near-empty axes from being blown up). Symmetric, so users and items go through it alike."""
    _, values, axes = torch.linalg.svd(centred.float(), full_matrices=False)
    scale = 1.0 / (values / values.max().clamp(min=1e-12) + eps)
    # with fewer items than dimensions the axes outside their span get 0: items have no component there, and a user's
    # component there would only rescale that user's scores, so ranking is the same and the cosine stays bounded
    return axes.t() @ torch.diag(scale) @ axes


class LaserItemWorker:
    """A Ray actor of the item refresh: its own Laser built from the run's config and dataset, on the GPU Ray gave
    it (or the CPU), taking the trainer's trainable weights when their version changes."""

    def __init__(self, config, dataset, num_cpus):
        set_worker_threads(num_cpus)
        config["device"] = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        config["llm_workers"] = 1
        config["init_checkpoint"] = None
        self.model = Laser(config, dataset).to(config["device"]).eval()
        self.version = None

    @torch.no_grad()
    def encode(self, state, version, batch):
        if version != self.version:
            self.model.load_state_dict(state)
            self.version = version
        return self.model.encode_items(torch.tensor(batch, dtype=torch.long, device=self.model.device)).cpu()


def _require_native_backbone(llm, llm_path):
    """Laser feeds inputs_embeds [batch, seq, hidden] to the backbone; remote-code models may not take them."""
    module = type(llm).__module__
    if not module.startswith("transformers."):
        raise ConfigError(
            f"Laser needs a transformers-native decoder LLM (Llama, Mistral, Qwen2, ...), whose backbone takes "
            f"inputs_embeds in [batch, seq, hidden]; llm_path={llm_path!r} loads {type(llm).__name__} from remote "
            f"code ({module}), which Laser cannot feed its prefix and suffix vectors to (ChatGLM2, for one, needs "
            f"input_ids and a [seq, batch] layout). Point llm_path at a native decoder, e.g. Llama-2-7b-chat-hf.")
