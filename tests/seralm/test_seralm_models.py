"""The four SeRALM knowledge-enhanced models: concatenated item vectors, knowledge overrides, the
alignment-facing interface, training a step, and scoring from cached vectors with no LLM loadable."""

import pytest
import torch

import recbole_llm  # noqa: F401  (registers the models with RecBole)
from recbole_llm.core.lookup import get_model, get_trainer
from recbole_llm.seralm import knowledge as K

from tests.helpers_seralm import N_ITEMS, FakeGenerator, build

torch.set_num_threads(1)

MODELS = ["CaserSeRALM", "SASRecSeRALM", "PAUPSeRALM", "LightSANsSeRALM"]
D_TEXT = 32  # tiny encoder width
WIDTH = 16   # hidden_size / embedding_size in the tiny config
PROJ = 6


def prefill_knowledge(config, dataset):
    """Generate (fake LLM) + encode (tiny encoder) once, so models only read caches."""
    K.generate_knowledge(dataset, config, generate_fn=FakeGenerator(), progress=False)
    return K.knowledge_matrix(dataset, config)


def forbid_llm_and_encoder(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no LLM/encoder may be loaded here")

    monkeypatch.setattr("recbole_llm.llm.loader.load_causal_lm", refuse)
    monkeypatch.setattr("recbole_llm.llm.loader.load_text_encoder", refuse)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per model: (config, train, test, model) on the tiny dataset, knowledge caches prefilled; the ``split``
    fusion, whose candidates carry the knowledge (the default ``project`` has its own tests below)."""
    out = {}
    for name in MODELS:
        tmp = tmp_path_factory.mktemp(name)
        config, dataset, train, valid, test = build(name, tmp, knowledge_concat="split")
        prefill_knowledge(config, dataset)
        torch.manual_seed(0)
        out[name] = (config, train, test, get_model(name)(config, train.dataset))
    return out


def first_batch(data):
    """The first Interaction of a loader (full-sort eval loaders yield tuples, train loaders Interactions)."""
    batch = next(iter(data))
    return batch[0] if isinstance(batch, tuple) else batch


@pytest.mark.parametrize("name", MODELS)
def test_item_vectors_are_id_then_projected_knowledge(built, name):
    config, train, test, model = built[name]
    model.eval()
    emb = model.item_embedding
    assert model.knowledge_vectors.shape == (N_ITEMS + 1, D_TEXT)
    assert emb.id_embedding.embedding_dim == WIDTH - PROJ and emb.knowledge_projection.out_features == PROJ
    table = emb.weight
    assert table.shape == (N_ITEMS + 1, WIDTH) and torch.all(table[0] == 0)
    ids = torch.tensor([[3, 0, 5], [1, 2, 12]])
    rows = emb(ids)
    assert rows.shape == (2, 3, WIDTH) and torch.allclose(rows, table[ids])
    assert torch.allclose(rows[0, 0, :WIDTH - PROJ], emb.id_embedding.weight[3])
    assert torch.allclose(rows[0, 0, WIDTH - PROJ:], emb.knowledge_projection(model.knowledge_vectors[3]))
    # the base model sees the combined vectors: changing knowledge changes its scores
    batch = first_batch(test)
    before = model.full_sort_predict(batch)
    assert before.shape == (batch[model.ITEM_SEQ].size(0), N_ITEMS + 1)
    saved = model.knowledge_vectors.clone()
    model.set_knowledge_vectors(torch.randn_like(saved))
    assert not torch.allclose(model.full_sort_predict(batch), before)
    model.set_knowledge_vectors(saved)
    assert torch.allclose(model.full_sort_predict(batch), before)
    with pytest.raises(ValueError, match=r"\[n_items, d_text\]"):
        model.set_knowledge_vectors(torch.zeros(3, D_TEXT))


@pytest.mark.parametrize("name", MODELS)
def test_knowledge_override_changes_only_the_overridden_item(built, name):
    config, train, test, model = built[name]
    model.eval()
    batch = first_batch(test)
    target = batch[model.POS_ITEM_ID]
    history = batch[model.ITEM_SEQ]
    base = model.target_log_prob(batch)
    assert base.shape == target.shape and torch.all(base <= 0)
    # an item that is neither in row 0's history nor its target
    item = next(i for i in range(1, N_ITEMS + 1) if i not in history[0].tolist() and i != int(target[0]))
    vector = torch.randn(D_TEXT, requires_grad=True)
    full_before = model.full_sort_predict(batch)
    new = model.target_log_prob(batch, knowledge_override={item: vector})
    assert not torch.allclose(new, base)
    # the override scores item differently, and leaves every other item's raw score in row 0 untouched
    with model._knowledge(model.override_table({item: vector})):
        full_after = model.full_sort_predict(batch)
    changed = (full_after - full_before).abs()[0] > 1e-6
    assert changed.nonzero().flatten().tolist() == [item]
    # gradients reach the recommender's parameters (and the override vector)
    model.zero_grad()
    new.sum().backward()
    assert model.item_embedding.knowledge_projection.weight.grad.abs().sum() > 0
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    # the cached matrix itself is untouched by overrides
    assert torch.allclose(model.target_log_prob(batch), base)
    # a full-matrix override equal to the cache is a no-op; a wrong shape is a clear error
    assert torch.allclose(model.target_log_prob(batch, knowledge_override=model.knowledge_vectors.clone()), base)
    with pytest.raises(ValueError, match="knowledge_override"):
        model.target_log_prob(batch, knowledge_override=torch.zeros(2, D_TEXT))


@pytest.mark.parametrize("name", MODELS)
def test_target_log_prob_matches_ce_loss(built, name):
    config, train, test, model = built[name]
    model.eval()
    batch = first_batch(train)
    loss = model.calculate_loss(batch)
    nll = -model.target_log_prob(batch).mean()
    if name == "CaserSeRALM":  # Caser adds an L2 term
        assert loss >= nll - 1e-5
    else:
        assert torch.allclose(loss, nll, atol=1e-5)
    override = {int(batch[model.POS_ITEM_ID][0]): torch.randn(D_TEXT)}
    assert not torch.allclose(model.calculate_loss(batch, knowledge_override=override), loss)


@pytest.mark.parametrize("name", MODELS)
def test_trains_and_predicts_without_any_llm(built, name, monkeypatch, tmp_path):
    from recbole.utils import init_seed

    from recbole_llm.core.checkpoint import load_checkpoint

    config, train, test, _ = built[name]
    forbid_llm_and_encoder(monkeypatch)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(name)(config, train.dataset)  # reads the caches only
    config["checkpoint_dir"] = str(tmp_path)
    trainer = get_trainer(config["MODEL_TYPE"], name)(config, model)
    before = [p.detach().clone() for p in model.parameters()]
    trainer._train_epoch(train, epoch_idx=0, show_progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    trainer._save_checkpoint(0, verbose=False)
    result = trainer.evaluate(test, load_best_model=False, show_progress=False)
    assert 0 <= result["ndcg@5"] <= 1
    # the checkpoint holds the knowledge buffer and reloads safely; a model built from the checkpoint's
    # config with knowledge_source: checkpoint needs no cache at all
    state = load_checkpoint(trainer.saved_model_file)
    assert torch.equal(state["state_dict"]["item_embedding.knowledge_vectors"], model.knowledge_vectors)
    saved_config = state["config"]
    saved_config["knowledge_source"] = "checkpoint"
    saved_config["knowledge_cache_dir"] = str(tmp_path / "empty")
    reloaded = get_model(name)(saved_config, train.dataset)
    reloaded.load_state_dict(state["state_dict"])
    model.eval(), reloaded.eval()
    batch = first_batch(test)
    assert torch.allclose(reloaded.full_sort_predict(batch), model.full_sort_predict(batch))


def test_rejects_bpr_and_bad_projection(tmp_path):
    config, dataset, train, valid, test = build("SASRecSeRALM", tmp_path, knowledge_concat="split")
    prefill_knowledge(config, dataset)
    config["knowledge_proj_size"] = WIDTH
    with pytest.raises(ValueError, match="knowledge_proj_size"):
        get_model("SASRecSeRALM")(config, train.dataset)
    config["knowledge_proj_size"] = PROJ
    config["loss_type"] = "BPR"
    with pytest.raises(ValueError, match="loss_type: CE"):
        get_model("SASRecSeRALM")(config, train.dataset)


def test_train_text_encoder_updates_encoder_and_refreshes_vectors(tmp_path):
    config, dataset, train, valid, test = build("SASRecSeRALM", tmp_path, train_text_encoder=True)
    prefill_knowledge(config, dataset)
    torch.manual_seed(0)
    model = get_model("SASRecSeRALM")(config, train.dataset)
    assert any(p.requires_grad for p in model.text_encoder.parameters())
    cached = model.knowledge_vectors.clone()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(2):  # the fusion's knowledge columns start at 0: the encoder gets gradient from the 2nd step on
        optimizer.zero_grad()
        loss = model.calculate_loss(first_batch(train))
        loss.backward()
        optimizer.step()
    assert model.text_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    model.eval()  # re-encodes every item with the updated encoder
    assert not torch.allclose(model.knowledge_vectors, cached)
    assert torch.all(model.knowledge_vectors[0] == 0)


def test_text_encoder_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    config, dataset, train, _, _ = build("SASRecSeRALM", tmp_path, train_text_encoder=True, hidden_dropout_prob=0.0,
                                         attn_dropout_prob=0.0)
    prefill_knowledge(config, dataset)
    batch = first_batch(train)
    results = []
    for checkpointing in (False, True):
        config["text_encoder_checkpointing"] = checkpointing
        torch.manual_seed(0)
        model = get_model("SASRecSeRALM")(config, train.dataset)
        model.text_encoder.config.hidden_dropout_prob = 0.0
        for module in model.text_encoder.modules():  # dropout off: the recomputed forward must be the same
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.train()
        encoder = model.text_encoder
        active = getattr(encoder, "is_activation_checkpointing", None)  # transformers 5.x; older: the other name
        assert (encoder.is_gradient_checkpointing if active is None else active) == checkpointing
        loss = model.calculate_loss(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.text_encoder.named_parameters()
                                        if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and grads_a.keys() == grads_b.keys() and grads_a
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-6) for n in grads_a)


@pytest.mark.parametrize("name", MODELS)
def test_widen_keeps_the_base_id_width_and_appends_the_knowledge(name, tmp_path):
    config, dataset, train, _, _ = build(name, tmp_path, knowledge_concat="widen")
    prefill_knowledge(config, dataset)
    model = get_model(name)(config, train.dataset)
    emb = model.item_embedding
    assert emb.id_embedding.embedding_dim == WIDTH  # the ID embedding is Base's
    assert emb.embedding_dim == WIDTH + PROJ and emb.knowledge_projection.out_features == PROJ
    assert config[model.width_key] == WIDTH  # the config keeps what the user gave (frozen base, reload)
    model.train()
    loss = model.calculate_loss(first_batch(train))
    loss.backward()
    assert torch.isfinite(loss) and emb.id_embedding.weight.grad is not None
    reloaded = get_model(name)(config, train.dataset)  # a rebuild from the same config: the same shapes
    reloaded.load_state_dict(model.state_dict())


BASES = {"CaserSeRALM": "Caser", "SASRecSeRALM": "SASRec", "PAUPSeRALM": "PAUP", "LightSANsSeRALM": "LightSANs"}


@pytest.mark.parametrize("name", MODELS)
def test_project_fusion_computes_exactly_the_base_model_at_initialisation(name, tmp_path):
    """The default fusion cannot start below its base: built with the same seed, the variant's base weights are
    the base model's, the fusion is [I ; 0], and every score (full sort, predict, CE loss) equals the base's."""
    from recbole.utils import init_seed

    config, dataset, train, _, test = build(name, tmp_path)
    assert config["knowledge_concat"] == "project" and config["knowledge_candidates"] == "id"
    prefill_knowledge(config, dataset)
    base_config, _, base_train, _, _ = build(BASES[name], tmp_path)
    init_seed(7, True)
    variant = get_model(name)(config, train.dataset).eval()
    init_seed(7, True)
    base = get_model(BASES[name])(base_config, base_train.dataset).eval()
    emb = variant.item_embedding
    assert emb.id_embedding.embedding_dim == WIDTH and emb.weight is emb.id_embedding.weight  # full-width candidates
    assert torch.equal(emb.id_embedding.weight, base.item_embedding.weight)
    batch = first_batch(test)
    assert torch.equal(variant.full_sort_predict(batch), base.full_sort_predict(batch))
    train_batch = first_batch(train)
    assert torch.equal(variant.calculate_loss(train_batch), base.calculate_loss(train_batch))
    items = batch[variant.POS_ITEM_ID]
    batch.update(type(batch)({variant.ITEM_ID: items}))
    assert torch.allclose(variant.predict(batch), base.predict(batch), atol=1e-6)  # a gather of the full sort
    # the knowledge reaches the inputs (and only them): a trained fusion changes the scores, candidates stay the IDs
    with torch.no_grad():
        emb.fusion.weight[:, WIDTH:].normal_()
    assert not torch.allclose(variant.full_sort_predict(batch), base.full_sort_predict(batch))
    assert torch.equal(emb.weight, base.item_embedding.weight)
    assert torch.allclose(variant.predict(batch), variant.full_sort_predict(batch).gather(1, items[:, None]).squeeze(1),
                          atol=1e-5)


def test_project_fusion_can_score_fused_candidates_and_learns_its_knowledge_columns(tmp_path):
    config, dataset, train, _, test = build("SASRecSeRALM", tmp_path, knowledge_candidates="fused")
    prefill_knowledge(config, dataset)
    model = get_model("SASRecSeRALM")(config, train.dataset)
    emb = model.item_embedding
    assert torch.equal(emb.weight[1:], emb.id_embedding.weight[1:])  # [I ; 0]: fused = ID at initialisation
    model.train()
    model.calculate_loss(first_batch(train)).backward()
    assert emb.fusion.weight.grad[:, WIDTH:].abs().sum() > 0  # the knowledge columns get gradient from zero
    assert emb.knowledge_projection.weight.grad is None or emb.knowledge_projection.weight.grad.abs().sum() == 0
