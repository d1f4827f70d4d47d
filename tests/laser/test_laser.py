"""Laser on tiny models: M-Former routing/masks, frozen parts, Bi-Tuning inputs, loss, two-stage trainer,
checkpoints, resume, item-matrix cache, ablation switches."""

import os

import pytest
import torch

from recbole_llm.laser.mformer import MFormer, load_balance_loss, masked_router_probs
from tests import helpers_laser as H
from tests.helpers_foundation import listdir_without_locks

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # one folder for the whole module: the frozen BERT4Rec is trained once and then read from its cache
    return tmp_path_factory.mktemp("laser")


@pytest.fixture(scope="module")
def built(root):
    return H.build(root)


# ------------------------------------------------------------------------------------------- M-Former
def test_router_probs_and_load_balance_follow_eq_6_to_11():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [9.0, -9.0]]])  # third item is padding
    mask = torch.tensor([[True, True, False]])
    probs, scores = masked_router_probs(logits, mask)
    assert torch.allclose(probs[0, 2], torch.zeros(2))
    assert torch.allclose(scores, torch.tensor([[0.5, 0.5]]), atol=1e-6)  # padding would have tilted it to 0
    # f = (1/2, 1/2), P = (1/2, 1/2) -> K * sum f P = 2 * 0.5 = 1
    assert load_balance_loss(probs, mask).item() == pytest.approx(1.0, abs=1e-6)
    skewed = torch.tensor([[[3.0, 0.0], [3.0, 0.0]]])
    probs, _ = masked_router_probs(skewed, torch.ones(1, 2, dtype=torch.bool))
    p0 = torch.softmax(torch.tensor([3.0, 0.0]), 0)[0].item()
    assert load_balance_loss(probs, torch.ones(1, 2, dtype=torch.bool)).item() == pytest.approx(2 * p0, abs=1e-5)


def _mformer(**kw):
    torch.manual_seed(0)
    args = dict(n_experts=3, n_query_tokens=2, hidden_size=16, n_layers=3, n_heads=2, inner_size=32, dropout=0.0)
    args.update(kw)
    return MFormer(8, 12, **args).eval()


def test_mformer_shapes_and_padding_is_never_routed_or_attended():
    model = _mformer()
    collab = torch.randn(4, 5, 8)
    lengths = torch.tensor([5, 3, 1, 2])
    mask = torch.arange(5)[None] < lengths[:, None]
    prefix, lb, chosen = model(collab, mask)
    assert prefix.shape == (4, 2, 12) and chosen.shape == (4,) and lb.dim() == 0
    assert [b.cross_attention for b in model.blocks] == [True, False, True]
    noisy = collab.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), 8) * 100
    prefix2, lb2, chosen2 = model(noisy, mask)
    assert torch.equal(chosen, chosen2)
    assert torch.allclose(prefix, prefix2, atol=1e-5) and torch.allclose(lb, lb2)
    # real positions do matter
    changed = collab.clone()
    changed[0, 0] += 5
    assert not torch.allclose(model(changed, mask)[0][0], prefix[0])


def test_router_gradient_modes():
    collab, mask = torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool)
    gated = _mformer(router_gradient="gate")
    gated(collab, mask)[0].pow(2).sum().backward()
    assert gated.router.weight.grad is not None and gated.router.weight.grad.abs().sum() > 0
    lb_only = _mformer(router_gradient="lb_only")
    lb_only(collab, mask)[0].pow(2).sum().backward()
    assert lb_only.router.weight.grad is None  # only L_LB would reach it
    assert lb_only.experts.grad is not None
    with pytest.raises(ValueError, match="router_gradient"):
        _mformer(router_gradient="soft")


def test_router_is_eq5_without_bias_unless_asked():
    """Eq. 5: m(u) = C_u W_r^T, so the router scores of a zero state are all 0 and every expert gets 1/K."""
    collab, mask = torch.zeros(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    plain = _mformer()
    assert plain.router.bias is None
    _, scores = masked_router_probs(plain.router(collab), mask)
    assert torch.allclose(scores, torch.full_like(scores, 1 / 3))
    biased = _mformer(router_bias=True)
    assert biased.router.bias is not None and "router.bias" in biased.state_dict()


# --------------------------------------------------------------------------------------- model parts
def test_frozen_sr_states_cache_and_state_dict(built, root, monkeypatch):
    config, model, train_data, _, _ = built
    batch = H.first_batch(train_data)
    states, mask = model.frozen_sr(batch["item_id_list"], batch["item_length"])
    assert states.shape == (*batch["item_id_list"].shape, 16)
    assert torch.equal(mask, torch.arange(5)[None] < batch["item_length"][:, None])
    assert not model.frozen_sr.training and not any(p.requires_grad for p in model.frozen_sr.parameters())
    cached = listdir_without_locks(os.path.join(str(root), "saved", "frozen_sr"))
    assert len(cached) == 1 and cached[0].startswith("BERT4Rec-tiny-laser-")
    keys = model.state_dict().keys()
    assert not any(k.startswith(("llm.", "frozen_sr.")) for k in keys) and "suffix" in keys
    # a second build reads the cache instead of training again
    import recbole_llm.core.cached_recommender as cached_recommender

    monkeypatch.setattr(cached_recommender, "train_frozen_sr", lambda *a, **k: pytest.fail("retrained a cached SR"))
    H.build(root, n_experts=2)


def test_frozen_bert4rec_training_survives_a_batch_without_masked_items(built):
    # RecBole's BERT4Rec divides by the number of masked targets: a batch with none gives NaN and stops training
    from recbole.data import create_dataset, data_preparation
    from recbole.data.interaction import Interaction
    from recbole.model.sequential_recommender import BERT4Rec

    from recbole_llm.core.cached_recommender import trainable_sr_class
    from recbole_llm.laser.frozen_sr import build_sr_config

    sr_config = build_sr_config(built[0])
    train_data, _, _ = data_preparation(sr_config, create_dataset(sr_config))
    batch = H.first_batch(train_data)
    H.seeded(0)
    stock = BERT4Rec(sr_config, train_data._dataset).eval()  # eval: no dropout, so the two losses compare
    H.seeded(0)
    guarded = trainable_sr_class("BERT4Rec")(sr_config, train_data._dataset).eval()
    assert isinstance(guarded, BERT4Rec)
    assert torch.equal(stock.calculate_loss(batch), guarded.calculate_loss(batch))  # normal batches: unchanged
    no_target = (stock.MASK_INDEX, stock.POS_ITEMS, stock.NEG_ITEMS)
    empty = Interaction({k: torch.zeros_like(v) if k in no_target else v for k, v in batch.interaction.items()})
    assert torch.isnan(stock.calculate_loss(empty))
    loss = guarded.calculate_loss(empty)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.isnan().any() for p in guarded.parameters())


def test_cut_item_texts_stay_apart_unless_their_full_texts_are_equal():
    from recbole_llm.laser.model import truncate_keeping_apart

    texts = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9], [1, 2, 3, 4, 5, 6], [7, 8, 9], [1, 2], [1, 2, 3, 4, 5, 6, 7]]
    cut = truncate_keeping_apart(texts, 2, step=1)
    assert cut[3] == [7, 8] and cut[4] == [1, 2]  # unique at the cap: cut there
    assert cut[0] == cut[2] == [1, 2, 3, 4, 5, 6]  # equal full texts stay equal (whole, since 5 shares their start)
    assert cut[1] == [1, 2, 3, 4, 9] and cut[5] == [1, 2, 3, 4, 5, 6, 7]
    distinct_full = {tuple(t) for t in texts}
    assert len({tuple(t) for t in cut}) == len(distinct_full)
    assert truncate_keeping_apart(texts, 100) == texts


def test_text_template_pieces(built):
    _, model, _, _, _ = built
    seq, length = torch.tensor([[3, 5, 0, 0, 0]]), torch.tensor([2])
    text = model.tokenizer.decode(model.user_token_ids(seq, length)[0])
    assert text.startswith("You are an intelligent recommendation assistant.")
    assert "into a single token based on the browsing history" in text
    assert "\n>> 1." in text and "\n>> 2." in text and "\n>> 3." not in text
    item_text = model.tokenizer.decode(model.item_token_ids(torch.tensor([3]))[0])
    assert item_text.startswith("You are an intelligent") and "\n>> 1." in item_text


def _with_post_processor(template):
    """The tiny tokenizer, made to add special tokens around a text as real LLM tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    from recbole_llm.llm.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    specials = [(t, tokenizer.convert_tokens_to_ids(t)) for t in ("<s>", "</s>")]
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=template, special_tokens=specials)
    return tokenizer


def test_leading_special_tokens_are_the_ones_a_tokenizer_puts_before_a_text():
    from recbole_llm.laser.model import leading_special_ids
    from recbole_llm.llm.tiny import build_tiny_tokenizer

    assert leading_special_ids(build_tiny_tokenizer()) == []  # adds nothing, like SmolLM2
    llama_like = _with_post_processor("<s> $A")
    assert leading_special_ids(llama_like) == [llama_like.bos_token_id]
    glm_like = _with_post_processor("<s> </s> $A")  # two, as ChatGLM2's [gMASK] sop would be
    assert leading_special_ids(glm_like) == [glm_like.bos_token_id, glm_like.eos_token_id]
    bert_like = _with_post_processor("<s> $A </s>")  # the trailing one is not Laser's: s ends the input
    assert leading_special_ids(bert_like) == [bert_like.bos_token_id]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_texts_start_with_the_llm_tokenizers_own_special_tokens(root, monkeypatch, add_special_tokens):
    from recbole_llm.laser import model as laser_module

    monkeypatch.setattr(laser_module, "leading_special_ids", lambda tokenizer: [tokenizer.bos_token_id])
    _, model, train_data, _, _ = H.build(root, add_special_tokens=add_special_tokens)
    bos = model.tokenizer.bos_token_id
    seq, length = torch.tensor([[3, 5, 0, 0, 0]]), torch.tensor([2])
    user, item = model.user_token_ids(seq, length)[0], model.item_token_ids(torch.tensor([3]))[0]
    if add_special_tokens:
        assert user[0] == item[0] == bos and bos not in user[1:] + item[1:]
    else:
        assert bos not in user + item
    model.calculate_loss(H.first_batch(train_data))  # a full forward with it


def test_only_prefix_suffix_mformer_get_gradients(built):
    _, model, train_data, _, _ = built
    model.train()
    model.refresh_item_matrix(show_progress=False)
    model.zero_grad()
    sum(model.calculate_loss(H.first_batch(train_data))).backward()
    for name, param in model.llm.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    for name, param in model.frozen_sr.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    trainable = H.trainable_names(model)
    assert trainable and all(n == "suffix" or n.startswith("prefix_module.") for n in trainable)
    assert model.suffix.grad is not None and model.suffix.grad.abs().sum() > 0
    assert model.prefix_module.experts.grad.abs().sum() > 0
    assert model.prefix_module.blocks[0].cross_attn.in_proj_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling, with_prefix", [("suffix", True), ("eos", True), ("mean", False)])
def test_inputs_embeds_matches_a_row_by_row_build(built, pooling, with_prefix, monkeypatch):
    # the batched scatter build against the obvious per-row one: [P ; text ; s], left-padded with zeros
    _, model, _, _, _ = built
    monkeypatch.setattr(model, "pooling", pooling)
    embed = model.llm.get_input_embeddings()
    model.zero_grad(set_to_none=True)
    token_ids = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    torch.manual_seed(0)
    prefix = torch.randn(3, 2, model.llm_size, requires_grad=True) if with_prefix else None
    embeds, mask = model._inputs_embeds(token_ids, prefix)
    tail = {"suffix": model.suffix[None], "eos": embed(model.eos_ids), "mean": None}[pooling]
    rows = []
    for b, ids in enumerate(token_ids):
        parts = ([prefix[b]] if with_prefix else []) + [embed(torch.tensor(ids))] + ([tail] if tail is not None else [])
        rows.append(torch.cat(parts))
    width = max(len(r) for r in rows)
    assert embeds.shape == (3, width, model.llm_size)
    for b, row in enumerate(rows):
        pad = width - len(row)
        assert torch.equal(embeds[b, pad:], row) and not embeds[b, :pad].any()
        assert mask[b].tolist() == [0] * pad + [1] * len(row)
    if embeds.requires_grad:
        embeds.sum().backward()  # gradients reach the trainable prefix and suffix
    if with_prefix:
        assert torch.equal(prefix.grad, torch.ones_like(prefix))
    if pooling == "suffix":
        assert torch.equal(model.suffix.grad, torch.full_like(model.suffix, 3.0))
    model.zero_grad()


def test_left_padding_does_not_change_user_embedding(built):
    _, model, _, _, _ = built
    model.eval()
    seq = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]])
    length = torch.tensor([5, 1])
    with torch.no_grad():
        both = model.forward(seq, length)[0]
        alone = model.forward(seq[1:], length[1:])[0]
    assert torch.allclose(both[1], alone[0], atol=1e-4)


def test_item_matrix_cache_and_full_sort_uses_it(built, monkeypatch):
    _, model, _, valid_data, _ = built
    model.eval()
    model.refresh_item_matrix(force=True, show_progress=False)
    assert model.refresh_item_matrix(show_progress=False) is False  # nothing changed: not recomputed
    model.mark_parameters_updated()
    assert model.refresh_item_matrix(show_progress=False) is True
    interaction = H.first_batch(valid_data)[0]
    fixed = torch.nn.functional.normalize(torch.randn(model.n_items, model.llm_size), dim=-1)
    model.item_matrix = fixed
    monkeypatch.setattr(model, "refresh_item_matrix", lambda *a, **k: pytest.fail("refreshed during predict"))
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
        users = torch.nn.functional.normalize(model.forward(interaction["item_id_list"],
                                                            interaction["item_length"])[0], dim=-1)
    assert scores.shape == (len(interaction), model.n_items)
    assert torch.allclose(scores, users @ fixed.t(), atol=1e-5)


@pytest.mark.parametrize("prefix_lr", [None, 1e-6])
def test_prefix_generator_has_its_own_learning_rate_when_asked(root, prefix_lr):
    from recbole_llm.laser.trainer import LaserTrainer
    config, model, _, _, _ = H.build(root, learning_rate=1e-3, prefix_learning_rate=prefix_lr)
    groups = LaserTrainer(config, model).optimizer.param_groups
    rates = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert set(rates) == {id(p) for p in model.parameters() if p.requires_grad}
    assert rates[id(model.suffix)] == 1e-3
    assert {rates[id(p)] for p in model.prefix_module.parameters()} == {prefix_lr or 1e-3}


def test_loss_decreases_over_a_few_steps(root):
    config, model, train_data, _, _ = H.build(root, learning_rate=0.01)
    batch = H.first_batch(train_data)
    model.refresh_item_matrix(show_progress=False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = sum(model.calculate_loss(batch))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# --------------------------------------------------------------------------------------------- trainer
def test_two_stage_fit_checkpoint_and_resume(root):
    from recbole_llm.laser.trainer import LaserTrainer

    config, model, train_data, valid_data, test_data = H.build(root, stage1_epochs=2, stage2_epochs=1)
    trainer = LaserTrainer(config, model)
    assert all(p.requires_grad for group in trainer.optimizer.param_groups for p in group["params"])
    refreshes = []
    original = model.refresh_item_matrix

    def counting(*args, **kwargs):
        done = original(*args, **kwargs)
        refreshes.append((model.training_stage, done))
        return done

    model.refresh_item_matrix = counting
    stage1_matrices = []
    trainer_valid = trainer._valid_epoch

    def remember(valid, show_progress=False):
        if model.training_stage == 1:
            stage1_matrices.append(model.item_matrix.clone())
        return trainer_valid(valid, show_progress=show_progress)

    trainer._valid_epoch = remember
    trainer.fit(train_data, valid_data, saved=True)
    # stage 1: the first epoch's start, then before each validation (the next epoch starts from that matrix); none in
    # stage 2, whose matrix is the best stage-1 epoch's
    assert [r for r in refreshes if r[1]] == [(1, True)] * 3
    assert model.training_stage == 2
    assert any(torch.equal(model.item_matrix, m) for m in stage1_matrices)  # stage 2 uses a stage-1 matrix

    checkpoint = torch.load(trainer.saved_model_file, weights_only=True)
    assert checkpoint["laser_stage"] == 2 and checkpoint["other_parameter"]["training_stage"] == 2
    assert not any(k.startswith(("llm.", "frozen_sr.")) for k in checkpoint["state_dict"])
    assert torch.equal(checkpoint["other_parameter"]["item_matrix"], model.item_matrix)
    result = trainer.evaluate(test_data, load_best_model=True)
    assert set(result) == {"recall@10", "ndcg@10", "mrr@10"}

    # reload into a fresh model: same weights, same matrix, same scores
    _, fresh, _, _, _ = H.build(root, stage1_epochs=2, stage2_epochs=1)
    fresh.load_state_dict(checkpoint["state_dict"])
    fresh.load_other_parameter(checkpoint["other_parameter"])
    model.eval(), fresh.eval()
    interaction = H.first_batch(test_data)[0]
    with torch.no_grad():
        assert torch.allclose(model.full_sort_predict(interaction), fresh.full_sort_predict(interaction), atol=1e-5)

    # resume from the stage-2 checkpoint: continues in stage 2, nothing left to train
    resumed = LaserTrainer(config, fresh)
    resumed.resume_checkpoint(trainer.saved_model_file)
    assert fresh.training_stage == 2 and resumed.start_epoch == checkpoint["epoch"] + 1


@pytest.mark.parametrize("stages,centering", [((2, 0), "none"), ((1, 2), "none"), ((0, 2), "none"),
                                              ((1, 2), "whiten"), ((1, 2), "whiten+user_mean")],
                         ids=["stage1", "stage2", "no_stage1", "stage2_whiten", "stage2_user_mean"])
def test_a_checkpoints_item_matrix_is_the_one_its_own_weights_make(root, stages, centering):
    """Validation, test and a reloaded checkpoint score against the matrix of the weights being scored: after stage 1
    the epoch's own weights, in stage 2 the frozen item side that made the fixed matrix (saved with it); with
    user_centering: user_mean the saved user centre is the one the saved user side makes."""
    from recbole_llm.laser.trainer import LaserTrainer

    stage1, stage2 = stages
    centering, _, user_centering = centering.partition("+")
    overrides = dict(stage1_epochs=max(stage1, 1), stage2_epochs=max(stage2, 1), skip_stage1=stage1 == 0,
                     skip_stage2=stage2 == 0, train_samples_per_epoch=16, learning_rate=0.05, score_centering=centering,
                     user_centering=user_centering or "item_mean")
    config, model, train_data, valid_data, _ = H.build(root, **overrides)
    trainer = LaserTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    checkpoint = torch.load(trainer.saved_model_file, weights_only=True)
    assert checkpoint["other_parameter"]["training_stage"] == (2 if stage2 else 1)
    assert any(k.startswith("item_tower.") for k in checkpoint["state_dict"]) == bool(stage2)
    _, fresh, _, _, _ = H.build(root, **overrides)
    fresh.load_state_dict(checkpoint["state_dict"])
    fresh.load_other_parameter(checkpoint["other_parameter"])
    saved = fresh.item_matrix.clone()
    saved_whitening = fresh.item_whitening
    saved_user_center = fresh.user_center
    fresh.refresh_item_matrix(force=True, show_progress=False)
    assert torch.allclose(fresh.item_matrix, saved, atol=1e-5)
    assert (saved_user_center is None) == (not user_centering)
    if saved_user_center is not None:  # in stage 2 the user side trained on after the matrix was fixed
        assert torch.allclose(fresh.user_center, saved_user_center, atol=1e-5)
    assert (saved_whitening is None) == (centering != "whiten")
    if saved_whitening is not None:  # the transform is the one the matrix's own weights make, saved with it
        assert torch.allclose(fresh.item_whitening, saved_whitening, atol=1e-4)
    if stage2 and centering == "none":  # the user side moved on (its best epoch here is a trained stage-2 one)
        assert not torch.equal(fresh.suffix, fresh.item_tower.suffix)
        assert not any(p.requires_grad for p in fresh.item_tower.parameters())


def test_resume_from_stage1_checkpoint_moves_on_to_stage2(root):
    from recbole_llm.laser.trainer import LaserTrainer

    config, model, train_data, valid_data, _ = H.build(root, stage1_epochs=1, stage2_epochs=1, skip_stage2=True)
    trainer = LaserTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=True)
    assert model.training_stage == 1
    stage1_matrix = model.item_matrix.clone()
    config2, model2, _, _, _ = H.build(root, stage1_epochs=1, stage2_epochs=1)
    trainer2 = LaserTrainer(config2, model2)
    trainer2.resume_checkpoint(trainer.saved_model_file)
    assert trainer2.start_epoch == 1 and model2.training_stage == 1
    trainer2.fit(train_data, valid_data, saved=False)
    assert model2.training_stage == 2
    assert torch.equal(model2.item_matrix, stage1_matrix)  # stage 2 kept the best stage-1 matrix


# -------------------------------------------------------------------------------------------- ablations
ABLATIONS = [
    {"use_moe": False},
    {"use_mformer": False},
    {"use_mformer": False, "no_mformer_prefix": "linear"},
    {"suffix_init": "eos"},
    {"use_prefix": False},
    {"pooling": "mean"},
    {"pooling": "eos"},
    {"template": "no_single_token"},
    {"template": "no_instruction"},
    {"template": "item_instruction"},
    {"frozen_sr_model": "SASRec"},
    {"iic_positive_grad": True},
    {"skip_stage1": True},
    {"skip_stage2": True},
]


@pytest.mark.parametrize("switch", ABLATIONS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_each_ablation_builds_and_trains(root, switch):
    from recbole_llm.laser.trainer import LaserTrainer

    config, model, train_data, valid_data, _ = H.build(root, stage1_epochs=1, stage2_epochs=1,
                                                       train_samples_per_epoch=8, **switch)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = LaserTrainer(config, model)
    trainer.fit(train_data, valid_data, saved=False)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed
    if switch.get("use_prefix") is False:
        assert model.prefix_module is None
    if switch.get("use_mformer") is False:
        from recbole_llm.laser.mformer import LearnedPrefix, LinearPrefix

        expected = LinearPrefix if switch.get("no_mformer_prefix") == "linear" else LearnedPrefix
        assert type(model.prefix_module) is expected
        collab, mask = torch.randn(2, 3, model.frozen_sr.hidden_size), torch.ones(2, 3, dtype=torch.bool)
        prefix = model.prefix_module(collab, mask)[0]
        # learned: no ID information, the same tokens for every user; linear: one projection per user state
        assert torch.equal(prefix[0], prefix[1]) == (expected is LearnedPrefix)
    if switch.get("use_moe") is False:
        assert model.prefix_module.n_experts == 1
    if switch.get("pooling") in ("mean", "eos"):
        assert not hasattr(model, "suffix") or not isinstance(model.suffix, torch.nn.Parameter)
    if "skip_stage1" in switch:
        assert trainer.stage1_epochs == 0 and model.training_stage == 2
    if "skip_stage2" in switch:
        assert trainer.stage2_epochs == 0 and model.training_stage == 1
    if "template" in switch:
        text = model.tokenizer.decode(model.item_token_ids(torch.tensor([1]))[0])
        if switch["template"] == "no_instruction":
            assert text.startswith("\n>> 1.")
        elif switch["template"] == "no_single_token":
            assert "single token" not in text and "Please summarize the user's characteristics based" in text
        else:
            assert "Please summarize the item characteristics into a single token:" in text


def test_bad_keys_give_clear_errors(root):
    with pytest.raises(ValueError, match="pooling"):
        H.build(root, pooling="max")
    with pytest.raises(ValueError, match="frozen_sr_model"):
        H.build(root, frozen_sr_model="GRU4Rec")


def test_epochs_is_what_the_two_stages_run_and_an_explicit_value_is_split_over_them(root):
    from recbole_llm.core.config import Config
    from recbole_llm.core.errors import ConfigError
    from recbole_llm.laser.model import split_epochs

    def settled(**overrides):
        config_dict = H.tiny_config_dict(root, stage1_epochs=3, stage2_epochs=2, **overrides)
        config = Config(model="Laser", dataset="tiny-laser", config_dict=config_dict, cmd_args=[])
        return config["epochs"], config["stage1_epochs"], config["stage2_epochs"]

    assert settled() == (5, 3, 2)  # the YAML's 20 would have been printed in the config dump while 5 ran
    assert settled(skip_stage1=True)[0] == 2 and settled(skip_stage2=True)[0] == 3
    assert settled(epochs=5) == (5, 3, 2)
    assert settled(epochs=1) == (1, 1, 0)  # RecBole's harness passes epochs: 1 to every model
    assert settled(epochs=7) == (7, 5, 2) and settled(epochs=10) == (10, 6, 4)
    assert settled(epochs=4, skip_stage1=True)[0] == 4 and settled(epochs=4, skip_stage2=True)[:2] == (4, 4)
    assert split_epochs(1, 15, 5) == (1, 0) and split_epochs(4, 15, 5) == (3, 1) and split_epochs(40, 15, 5) == (30, 10)
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="cannot be split over Laser's two stages"):
            settled(epochs=bad)


def test_train_samples_per_epoch_bounds_the_steps(built):
    from recbole_llm.laser.trainer import LaserTrainer

    config, model, train_data, _, _ = built
    trainer = LaserTrainer(config, model)
    seen = []
    versions_before = model.param_version
    trainer._train_epoch(train_data, 0, loss_func=lambda inter: (seen.append(len(inter)), model.calculate_loss(inter))[1])
    assert sum(seen) == 16 and len(seen) == 2  # train_samples_per_epoch=16, batch 8
    assert model.param_version == versions_before + 2  # each optimizer step marks the item matrix stale
    first = [int(u) for u in H.first_batch(train_data)["user_id"]]
    second = [int(u) for u in H.first_batch(train_data)["user_id"]]
    assert first != second  # a different random subset each epoch


def test_stage2_never_ends_worse_than_the_best_stage1_state(root, caplog):
    from recbole_llm.laser.trainer import LaserTrainer

    config, model, train_data, valid_data, _ = H.build(root, stage1_epochs=1, stage2_epochs=2)
    trainer = LaserTrainer(config, model)
    real_valid = trainer._valid_epoch
    scores = iter([0.5, 0.1, 0.2])  # stage 1 validates best; both stage-2 epochs validate worse

    def scripted(valid, show_progress=False):
        _, result = real_valid(valid, show_progress=show_progress)
        return next(scores), result

    trainer._valid_epoch = scripted
    with caplog.at_level("INFO"):
        best, _ = trainer.fit(train_data, valid_data, saved=True)
    assert best == 0.5
    # one "Saving current" for stage 1's best; the stage-2 line names the second save of the same file
    assert caplog.text.count("Saving current") == 1
    assert "from the best stage-1 state, saved as stage 2's first checkpoint" in caplog.text
    checkpoint = torch.load(trainer.saved_model_file, weights_only=True)
    # the best checkpoint is the stage-2 starting point: best stage-1 weights, stage 2, resumable in stage 2
    assert checkpoint["epoch"] == 0 and checkpoint["laser_stage"] == 2 and checkpoint["best_valid_score"] == 0.5


def test_a_run_reports_the_epoch_its_saved_weights_come_from(root):
    """Stage 2 starts from the best stage-1 state and saves it under stage 1's last epoch (where a resume goes on);
    the run's best_epoch is still the epoch those weights come from."""
    from recbole_llm.laser.trainer import LaserTrainer
    from recbole_llm.run.quick_start import training_extent

    config, model, train_data, valid_data, _ = H.build(root, stage1_epochs=2, stage2_epochs=1)
    trainer = LaserTrainer(config, model)
    real_valid = trainer._valid_epoch
    scores = iter([0.5, 0.1, 0.2])  # epoch 0 validates best; stage 1's epoch 1 and stage 2's epoch 2 worse

    def scripted(valid, show_progress=False):
        _, result = real_valid(valid, show_progress=show_progress)
        return next(scores), result

    trainer._valid_epoch = scripted
    trainer.fit(train_data, valid_data, saved=True)
    checkpoint = torch.load(trainer.saved_model_file, weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["laser_stage"] == 2 and checkpoint["best_epoch"] == 0
    assert training_extent(trainer, saved=True) == {"epochs_run": 3, "best_epoch": 0}


# ------------------------------------------------------------------------------------- paper choices
def test_suffix_starts_random_as_the_paper_says_or_from_eos_on_request(root, built):
    from recbole_llm.llm.loader import input_embeddings

    model = built[1]
    table = input_embeddings(model.llm).weight.detach().float()
    eos = table[model.tokenizer.eos_token_id]
    assert not torch.allclose(model.suffix.detach(), eos)
    assert model.suffix.detach().std().item() == pytest.approx(table.std().item(), rel=0.5)  # on a token's scale
    eos_model = H.build(root, suffix_init="eos")[1]
    assert torch.equal(eos_model.suffix.detach(), eos)


def test_load_state_dict_invalidates_the_cached_item_matrix(built):
    model = built[1]
    model.refresh_item_matrix(force=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["suffix"] = state["suffix"] + 1.0
    original = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert model.refresh_item_matrix() is True  # recomputed: the old matrix belongs to the old weights
    model.load_state_dict(original)  # the module's shared model, as it was


def test_remote_code_llm_is_refused_with_a_clear_error():
    from recbole_llm.core.errors import ConfigError
    from recbole_llm.laser.model import _require_native_backbone

    remote = type("ChatGLMForConditionalGeneration", (), {"__module__": "transformers_modules.chatglm2.modeling"})
    with pytest.raises(ConfigError, match="transformers-native decoder"):
        _require_native_backbone(remote(), "/models/chatglm2-6b")


def test_paper_defaults_never_early_stop_inside_a_stage_and_bad_choices_fail_at_config(root):
    from recbole_llm.core.config import Config
    from recbole_llm.core.errors import ConfigError

    config = Config(model="Laser", dataset="tiny-laser", config_dict=H.tiny_config_dict(root))
    assert config["suffix_init"] == "random" and config["no_mformer_prefix"] == "learned"
    with pytest.raises(ConfigError, match="'suffix_init' = 'zeros' is not one of"):
        Config(model="Laser", dataset="tiny-laser", config_dict=H.tiny_config_dict(root, suffix_init="zeros"))
    from recbole_llm.core.config import plugin_model_yaml
    import yaml

    with open(plugin_model_yaml("Laser")) as f:
        defaults = yaml.safe_load(f)
    assert defaults["stopping_step"] >= defaults["stage1_epochs"]


def test_losses_are_eq_8_and_eq_9_to_11_computed_by_hand(root):
    """IIC = cross-entropy of cos(h_u, h_i) / tau over all items (Eq. 8); lambda * K * sum_j f_j P_j per user over
    its real items, averaged over the batch (Eq. 9-11)."""
    import torch.nn.functional as F

    _, model, train_data, _, _ = H.build(root, temperature=0.05, lb_weight=0.01)
    model.eval()
    model.refresh_item_matrix(show_progress=False)
    batch = H.first_batch(train_data)
    seq, length = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    with torch.no_grad():
        iic, lb = model.calculate_loss(batch)
        users = F.normalize(model.forward(seq, length)[0], dim=-1)
        items = F.normalize(model.encode_items(torch.arange(1, model.n_items)), dim=-1)  # each item on its own
        expected_iic = F.cross_entropy(users @ items.t() / 0.05, batch[model.POS_ITEM_ID] - 1)
        collab, _ = model.frozen_sr(seq, length)
        probs = torch.softmax(model.prefix_module.router(collab), dim=-1)
        per_user = []
        for row in range(len(batch)):
            p = probs[row, :int(length[row])]
            f = torch.bincount(p.argmax(-1), minlength=p.size(-1)).float() / p.size(0)
            per_user.append(p.size(-1) * (f * p.mean(0)).sum())
    assert iic.item() == pytest.approx(expected_iic.item(), rel=1e-4)
    assert lb.item() == pytest.approx(0.01 * torch.stack(per_user).mean().item(), rel=1e-4)


def test_model_constructor_trains_no_recommender_its_trainer_does(tmp_path, monkeypatch):
    """A Laser built directly, as a RecBole script does, reads only SR weights that exist; the trainer layer
    trains and caches the frozen SR when it is first needed (here: scored under no_grad before any fit, as stock
    RecBole's FLOPs count does), once."""
    from recbole.data import create_dataset, data_preparation

    import recbole_llm.core.cached_recommender as cached_recommender
    from recbole_llm.core.config import Config
    from recbole_llm.core.lookup import get_trainer
    from recbole_llm.laser.model import Laser

    H.write_tiny_dataset(tmp_path)
    config = Config(model="Laser", dataset="tiny-laser", cmd_args=[],
                    config_dict=H.tiny_config_dict(tmp_path, frozen_sr_epochs=1, stage2_epochs=0))
    train_data, valid_data, _ = data_preparation(config, create_dataset(config))
    trained = []
    real = cached_recommender.train_frozen_sr
    monkeypatch.setattr(cached_recommender, "train_frozen_sr", lambda *a, **k: trained.append(1) or real(*a, **k))
    model = Laser(config, train_data._dataset)
    assert trained == [] and not model.frozen_sr.loaded
    batch = H.first_batch(train_data)
    with torch.no_grad():
        model(batch["item_id_list"], batch["item_length"])
    assert trained == [1] and model.frozen_sr.loaded
    get_trainer(config["MODEL_TYPE"], "Laser")(config, model).fit(train_data, valid_data, saved=False)
    assert trained == [1]
    again = Laser(config, train_data._dataset)  # now from the cache, not retrained
    assert trained == [1] and again.frozen_sr.loaded
    for a, b in zip(model.frozen_sr.parameters(), again.frozen_sr.parameters()):
        assert torch.equal(a, b)


def test_whitening_evens_out_the_item_matrix_axes_and_treats_users_and_items_alike():
    """score_centering: whiten scales each principal axis of the centred item matrix by 1 / (s_k / s_max + eps): a
    matrix with one dominant axis comes out with its axes near one scale; the transform is symmetric; with fewer
    items than dimensions, directions outside the items' span are dropped (they would only rescale a user)."""
    from recbole_llm.laser.model import whitening

    g = torch.Generator().manual_seed(0)
    items = torch.randn(200, 8, generator=g) * torch.tensor([30.0, 1, 1, 1, 1, 1, 1, 0.5])
    centred = items - items.mean(0)
    transform = whitening(centred, eps=0.01)
    assert torch.allclose(transform, transform.t(), atol=1e-5)
    before = torch.linalg.svdvals(centred)
    after = torch.linalg.svdvals(centred @ transform)
    assert before[0] / before[-1] > 40 and after[0] / after[-1] < 2  # eps keeps the smallest axis a little short
    few = torch.randn(3, 8, generator=g)
    few = few - few.mean(0)
    outside = torch.linalg.svd(few, full_matrices=True)[2][-1]  # orthogonal to every (centred) item
    assert torch.allclose(outside @ whitening(few, eps=0.01), torch.zeros(8), atol=1e-5)


def test_whiten_scores_are_cosines_after_the_items_transform(root):
    """Users and items go through the same centring and whitening: full_sort_predict is the cosine of
    (h_u - mu) W with the rows of the item matrix, which are (h_i - mu) W normalised."""
    from recbole_llm.laser.model import whitening

    config, model, train_data, _, _ = H.build(root, score_centering="whiten")
    model.eval()
    model.refresh_item_matrix(force=True, show_progress=False)
    with torch.no_grad():
        raw = model.encode_items(torch.arange(1, model.n_items))
        center = raw.mean(0)
        transform = whitening(raw - center, config["whitening_eps"])
        assert torch.allclose(model.item_whitening, transform, atol=1e-4)
        expected = torch.nn.functional.normalize((raw - center) @ transform, dim=-1)
        assert torch.allclose(model.item_matrix[1:], expected, atol=1e-4)
        batch = H.first_batch(train_data)
        user = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])[0]
        user = torch.nn.functional.normalize((user - center) @ transform, dim=-1)
        assert torch.allclose(model.full_sort_predict(batch), user @ model.item_matrix.t(), atol=1e-4)


def test_user_mean_centres_users_by_the_sample_users_mean_and_items_by_theirs(root):
    """user_centering: user_mean: full_sort_predict is the cosine of (h_u - mu_users) W with the item matrix rows
    (h_i - mu_items) W, mu_users the mean embedding of user_center_samples fixed training sequences, recomputed for
    evaluation once the weights change; the paper's plain cosine refuses it."""
    from recbole_llm.core.errors import ConfigError

    config, model, train_data, _, _ = H.build(root, score_centering="whiten", user_centering="user_mean",
                                              user_center_samples=8)
    model.eval()
    model.refresh_item_matrix(force=True, show_progress=False)
    with torch.no_grad():
        assert len(model.center_seq) == 8
        center = model.forward(model.center_seq, model.center_len)[0].mean(0)
        assert torch.allclose(model.user_center, center, atol=1e-5)
        assert not torch.allclose(center, model.item_center, atol=1e-3)
        batch = H.first_batch(train_data)
        user = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])[0]
        user = torch.nn.functional.normalize((user - center) @ model.item_whitening, dim=-1)
        assert torch.allclose(model.full_sort_predict(batch), user @ model.item_matrix.t(), atol=1e-4)
        model.suffix.add_(1.0)
        model.mark_parameters_updated()
        model.full_sort_predict(batch)
        assert not torch.allclose(model.user_center, center, atol=1e-3)  # the new weights' centre
    with pytest.raises(ConfigError, match="score_centering"):
        H.build(root, score_centering="none", user_centering="user_mean")


def test_remove_shared_user_gradient_keeps_the_loss_and_drops_the_batch_mean_gradient(root):
    """remove_shared_user_gradient: the same loss value; the gradient reaching the user vectors sums to zero over the
    batch (no part of it moves every user alike)."""
    config, model, train_data, _, _ = H.build(root, score_centering="whiten", user_centering="user_mean")
    _, removed, _, _, _ = H.build(root, score_centering="whiten", user_centering="user_mean",
                                  remove_shared_user_gradient=True)
    batch = H.first_batch(train_data)
    grads, losses = [], []
    for m in (model, removed):
        m.train()
        m._require_item_matrix()
        captured = {}
        real = m.forward

        def forward(*args, real=real, captured=captured):
            user, lb = real(*args)
            user.retain_grad()
            captured["user"] = user
            return user, lb
        m.forward = forward
        H.seeded(0)  # the same dropout draws
        loss = m.calculate_loss(batch)[0]
        loss.backward()
        losses.append(float(loss))
        grads.append(captured["user"].grad)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert float(grads[0].sum(0).norm()) > 1e-3 * float(grads[0].norm())
    assert float(grads[1].sum(0).norm()) < 1e-5 * float(grads[1].norm())


@pytest.mark.parametrize("centering", ["item_mean", "whiten"])
def test_sampled_negatives_loss_trains_both_towers(root, centering):
    """sampled_negatives: each user against the batch's positives and n random items, all encoded with grad; with
    whiten the scores use the last item matrix's centre and transform (a batch is too few rows to whiten)."""
    config, model, train_data, _, _ = H.build(root, sampled_negatives=4, score_centering=centering)
    model.train()
    loss, lb = model.calculate_loss(H.first_batch(train_data))
    assert torch.isfinite(loss) and (model.item_whitening is not None) == (centering == "whiten")
    (loss + lb).backward()
    assert model.suffix.grad is not None and float(model.suffix.grad.abs().sum()) > 0


def test_learned_temperature_starts_at_tau_trains_at_its_own_rate_and_ranks_as_the_loss(root, tmp_path):
    """temperature_learning_rate: 1/tau is a parameter starting at 1/temperature, in its own Adam group; the loss's
    logits are cos / tau + b_i and full_sort_predict ranks by cos + tau * b_i with the learned tau; an
    init_checkpoint without it leaves this run's start."""
    from recbole_llm.laser.trainer import LaserTrainer

    config, model, train_data, valid_data, _ = H.build(root, item_bias=True, temperature_learning_rate=0.5)
    assert float(model.tau()) == pytest.approx(0.05)
    trainer = LaserTrainer(config, model)
    rates = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert rates[id(model.log_inv_tau)] == 0.5
    model.train()
    loss = sum(model.calculate_loss(H.first_batch(train_data)))
    trainer.optimizer.zero_grad()
    loss.backward()
    trainer.optimizer.step()
    model.mark_parameters_updated()
    assert float(model.tau()) != pytest.approx(0.05, rel=1e-3)
    model.eval()
    interaction = H.first_batch(valid_data)[0]
    with torch.no_grad():
        user = model._user_embeddings_chunked(interaction["item_id_list"], interaction["item_length"])
        expected = user @ model.item_matrix.t() + model.tau() * model.item_bias
        assert torch.allclose(model.full_sort_predict(interaction), expected, atol=1e-5)
    _, fixed, _, _, _ = H.build(root, item_bias=True)
    path = tmp_path / "fixed.pth"
    torch.save({"state_dict": fixed.state_dict()}, path)
    model.load_trainable_weights(str(path))
    assert float(model.tau()) != pytest.approx(0.05, rel=1e-3)  # kept: the checkpoint had no learned tau


def test_log_popularity_item_bias_starts_at_the_training_counts_and_reads_no_held_out_interaction(root):
    """item_bias_init: log_popularity: b_i = log(1 + n_i) centred over the items, n_i counted over the training
    targets only; the untrained scores are the cosine plus tau * b_i, so items rank by count where cosines tie."""
    _, model, train_data, valid_data, _ = H.build(root, item_bias=True, item_bias_init="log_popularity")
    _, plain, _, _, _ = H.build(root, item_bias=True)
    train = train_data._dataset
    counts = torch.bincount(torch.as_tensor(train.inter_feat["item_id"]).long(), minlength=model.n_items).float()
    prior = torch.log1p(counts[1:model.n_items])
    assert float(model.item_bias.detach()[0]) == 0.0
    assert torch.allclose(model.item_bias.detach()[1:], prior - prior.mean(), atol=1e-6)
    assert float(counts.sum()) == len(train.inter_feat)  # one target per training sequence, none held out
    interaction = H.first_batch(valid_data)[0]
    with torch.no_grad():  # same seed, same weights: the prior is the only difference
        assert torch.allclose(model.eval().full_sort_predict(interaction),
                              plain.eval().full_sort_predict(interaction) + model.tau() * model.item_bias, atol=1e-5)


def test_item_bias_starts_at_zero_trains_at_its_own_rate_and_ranks_as_the_loss(root, tmp_path):
    """item_bias: untrained scores are the cosine's; the loss's logits are cos / tau + b_i and full_sort_predict ranks
    by cos + tau * b_i; b has its own Adam rate, trains, and is saved but not carried to another dataset's run."""
    from recbole_llm.laser.trainer import LaserTrainer

    _, plain, _, valid_data, _ = H.build(root)
    config, model, train_data, _, _ = H.build(root, item_bias=True, item_bias_learning_rate=0.5, learning_rate=1e-3)
    assert torch.equal(model.item_bias, torch.zeros(model.n_items))
    interaction = H.first_batch(valid_data)[0]
    with torch.no_grad():  # same seed, same weights: a zero bias scores as the paper's cosine
        assert torch.allclose(model.eval().full_sort_predict(interaction),
                              plain.eval().full_sort_predict(interaction), atol=1e-6)
    trainer = LaserTrainer(config, model)
    rates = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert rates[id(model.item_bias)] == 0.5 and rates[id(model.suffix)] == 1e-3
    batch = H.first_batch(train_data)
    model.train()
    loss = sum(model.calculate_loss(batch))
    trainer.optimizer.zero_grad()
    loss.backward()
    trainer.optimizer.step()
    assert float(model.item_bias.detach().abs().max()) > 0.1
    model.eval()
    with torch.no_grad():
        user = model._user_embeddings_chunked(interaction["item_id_list"], interaction["item_length"])
        expected = user @ model.item_matrix.t() + model.temperature * model.item_bias
        assert torch.allclose(model.full_sort_predict(interaction), expected, atol=1e-5)
    path = tmp_path / "laser.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    assert "item_bias" in torch.load(path, weights_only=True)["state_dict"]
    _, fresh, _, _, _ = H.build(root, item_bias=True)
    fresh.load_trainable_weights(str(path))  # init_checkpoint: its bias scores another dataset's items, not carried
    assert torch.equal(fresh.suffix, model.suffix) and torch.equal(fresh.item_bias, torch.zeros(model.n_items))
