"""SeRALM alignment (paper 4.4, Algorithm 1): the loss math, its gradient signs, the KL term, and the
AlignmentTrainer end to end on tiny models for the four variants."""

import math
import os

import pytest
import torch

from recbole_llm.seralm.alignment.loss import (
    alignment_llm_loss,
    importance_weights,
    membership_matrix,
    per_token_kl,
    subtract_baseline,
)
from tests.helpers_alignment import set_threads, tiny_config, tiny_data, tiny_model
from tests.helpers_foundation import listdir_without_locks

set_threads()


# ------------------------------------------------------------------------------------------ pure math
def test_importance_weights_are_the_detached_probability_ratio_with_optional_clip():
    logp_s = torch.tensor([-2.0, -5.0, -1.0], requires_grad=True)
    logp_base = torch.tensor([-3.0, -4.0, -1.0])
    w = importance_weights(logp_s, logp_base)
    assert torch.allclose(w, torch.exp(torch.tensor([1.0, -1.0, 0.0])))
    assert not w.requires_grad
    clipped = importance_weights(logp_s, logp_base, ratio_clip=2.0)
    assert torch.allclose(clipped, torch.tensor([2.0, math.exp(-1.0), 1.0]))
    with pytest.raises(ValueError, match="ratio_clip"):
        importance_weights(logp_s, logp_base, ratio_clip=0)


def test_loss_gradient_is_weighted_score_plus_kl_gradient():
    # Two instances, three texts; instance 0 owns texts 0 and 1, instance 1 owns text 2.
    cur = [torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-0.5], requires_grad=True),
           torch.tensor([-3.0, -1.0, -0.2], requires_grad=True)]
    orig = [torch.tensor([-1.5, -2.0]), torch.tensor([-0.5]), torch.tensor([-2.0, -1.0, -0.7])]
    weights = torch.tensor([3.0, 0.5])
    member = membership_matrix([[10, 11], [12]], [10, 11, 12])
    alpha = 0.2
    loss, stats = alignment_llm_loss(cur, orig, weights, member, alpha)
    loss.backward()
    b, u = 2, 3
    # d loss / d token = -w_b / B for the policy term, + alpha * (cur - orig) / U for the k2 KL term.
    expected = [-weights[0] / b + alpha * (cur[0].detach() - orig[0]) / u,
                -weights[0] / b + alpha * (cur[1].detach() - orig[1]) / u,
                -weights[1] / b + alpha * (cur[2].detach() - orig[2]) / u]
    for tensor, want in zip(cur, expected):
        assert torch.allclose(tensor.grad, want, atol=1e-6)
    assert stats["weight_max"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="membership"):
        alignment_llm_loss(cur, orig, weights, member[:, :2], alpha)


def test_leave_one_out_baseline_centres_the_weights_without_using_an_instances_own_weight():
    weights = torch.tensor([3.0, 0.5, 1.0, 1.5])
    adv = subtract_baseline(weights, "leave_one_out")
    for b in range(4):
        others = torch.cat([weights[:b], weights[b + 1:]]).mean()
        assert adv[b] == pytest.approx(float(weights[b] - others))
    assert float(adv.mean()) == pytest.approx(0.0, abs=1e-6)  # b's baseline never sees w_b: E[adv grad] unchanged
    assert torch.equal(subtract_baseline(weights, "none"), weights)
    assert torch.equal(subtract_baseline(weights[:1], "leave_one_out"), weights[:1])  # one instance: nothing to subtract
    with pytest.raises(ValueError, match="align_baseline"):
        subtract_baseline(weights, "mean")
    # in the loss: the policy gradient of a token of instance b is -(w_b - baseline_b) / B
    cur = [torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)]
    loss, stats = alignment_llm_loss(cur, [c.detach() for c in cur], torch.tensor([3.0, 1.0]),
                                     membership_matrix([[1], [2]], [1, 2]), 0.0, baseline="leave_one_out")
    loss.backward()
    assert float(cur[0].grad) == pytest.approx(-(3.0 - 1.0) / 2) and float(cur[1].grad) == pytest.approx(-(1.0 - 3.0) / 2)
    assert stats["advantage_std"] > 0


def test_kl_estimators_are_zero_at_identity_and_k2_k3_have_zero_gradient_there():
    for estimator in ("k1", "k2", "k3"):
        cur = [torch.tensor([-1.0, -0.3], requires_grad=True)]
        kl = per_token_kl(cur, [cur[0].detach().clone()], estimator)
        assert kl.item() == 0.0
        kl.sum().backward()
        if estimator == "k1":  # the literal Eq. 7 difference: non-zero gradient even at identity
            assert torch.all(cur[0].grad != 0)
        else:
            assert torch.all(cur[0].grad == 0)
    with pytest.raises(ValueError, match="kl_estimator"):
        per_token_kl(cur, cur, "k9")


# ---------------------------------------------------------------------------------- with a LoRA LLM
@pytest.fixture(scope="module")
def lora_llm(tmp_path_factory):
    from recbole_llm.llm.generate import build_chat_prompts, generate_with_ids
    from recbole_llm.llm.lora import build_lora_llm

    config = tiny_config("SASRecSeRALM", tmp_path_factory.mktemp("lora"), lora_r=4)
    llm, tokenizer = build_lora_llm(config, device="cpu")
    prompts = build_chat_prompts(tokenizer, ["describe glass beaker", "who likes steel scale"])
    gens = generate_with_ids(llm, tokenizer, prompts, max_new_tokens=6, do_sample=True, seed=3,
                             repetition_penalty=1.0, progress=False)
    return llm, tokenizer, [g["prompt_ids"] for g in gens], [g["gen_ids"] for g in gens]


def _logps(llm, prompt_ids, gen_ids, grad=False):
    from recbole_llm.llm.generate import sequence_logprobs

    with torch.set_grad_enabled(grad):
        return sequence_logprobs(llm, prompt_ids, gen_ids)


def _orig_logps(llm, prompt_ids, gen_ids):
    with llm.disable_adapter():
        return _logps(llm, prompt_ids, gen_ids)


def _sgd_step(llm, loss, lr):
    params = [p for p in llm.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= lr * g


def _total(logps):
    return float(sum(t.sum() for t in logps))


def _reset_lora(llm):
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if "lora_B" in name:
                p.zero_()


def test_kl_term_is_exactly_zero_with_zero_gradient_for_fresh_lora(lora_llm):
    llm, _, prompt_ids, gen_ids = lora_llm
    _reset_lora(llm)
    cur = _logps(llm, prompt_ids, gen_ids, grad=True)
    orig = _orig_logps(llm, prompt_ids, gen_ids)
    for c, o in zip(cur, orig):
        assert torch.equal(c.detach(), o)  # B = 0: the adapted LLM is the original LLM
    kl = per_token_kl(cur, orig).mean()
    assert kl.item() == 0.0
    params = [p for p in llm.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in llm.named_parameters() if p.requires_grad)
    grads = torch.autograd.grad(kl, params, allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_descent_step_raises_log_prob_of_sampled_text_when_weight_above_one(lora_llm):
    llm, _, prompt_ids, gen_ids = lora_llm
    _reset_lora(llm)
    orig = _orig_logps(llm, prompt_ids, gen_ids)
    member = torch.eye(len(gen_ids))
    before = _total(orig)

    # Weight p(y|x,s)/p(y|x) = e > 1: Eq. 10's direction, the sampled knowledge becomes more likely.
    weights = importance_weights(torch.tensor([0.0, 0.0]), torch.tensor([-1.0, -1.0]))
    assert torch.all(weights > 1)
    for _ in range(3):
        loss, _ = alignment_llm_loss(_logps(llm, prompt_ids, gen_ids, grad=True), orig, weights, member, alpha=0.1)
        _sgd_step(llm, loss, lr=0.5)
    raised = _total(_logps(llm, prompt_ids, gen_ids))
    assert raised > before + 1e-3

    # Weight -> 0: only the KL penalty acts; it pulls back toward the original LLM, never further up.
    zero = torch.zeros(len(gen_ids))
    loss, _ = alignment_llm_loss(_logps(llm, prompt_ids, gen_ids, grad=True), orig, zero, member, alpha=1.0)
    _sgd_step(llm, loss, lr=0.5)
    after = _total(_logps(llm, prompt_ids, gen_ids))
    assert after <= raised + 1e-6
    assert abs(after - before) < abs(raised - before)

    # Weight -> 0 on the original LLM: nothing moves at all (k2 KL has zero gradient at identity).
    _reset_lora(llm)
    loss, _ = alignment_llm_loss(_logps(llm, prompt_ids, gen_ids, grad=True), orig, zero, member, alpha=1.0)
    _sgd_step(llm, loss, lr=0.5)
    assert _total(_logps(llm, prompt_ids, gen_ids)) == pytest.approx(before, abs=1e-6)
    _reset_lora(llm)


# ----------------------------------------------------------------------------------- the trainer
VARIANTS = ["SASRecSeRALM", "CaserSeRALM", "PAUPSeRALM", "LightSANsSeRALM"]


@pytest.fixture(scope="module")
def shared_knowledge(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shared_knowledge"))


def _lora_b_norm(trainer):
    return sum(float(p.detach().abs().sum()) for n, p in trainer.llm.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("model_name", VARIANTS)
def test_each_variant_trains_one_alignment_step_end_to_end(model_name, tmp_path, shared_knowledge):
    from safetensors.torch import load_file

    from recbole_llm.core.lookup import get_trainer
    from recbole_llm.seralm.alignment.trainer import AlignmentTrainer, adapter_path

    config = tiny_config(model_name, tmp_path, knowledge_cache_dir=shared_knowledge, alignment_steps=1,
                         frozen_base_cache_dir=os.path.join(shared_knowledge, "frozen_base"))
    _, train, valid, test = tiny_data(config)
    model = tiny_model(config, train)
    trainer_class = get_trainer(config["MODEL_TYPE"], model_name)
    assert trainer_class is AlignmentTrainer
    trainer = trainer_class(config, model)
    base_vectors = model.knowledge_vectors.clone()
    rec_before = {k: v.clone() for k, v in model.state_dict().items()}

    # Phase B only, to check what one step of Algorithm 1 changes.
    from recbole_llm.llm.lora import build_lora_llm

    trainer.llm, trainer.tokenizer = build_lora_llm(config, device=trainer.device)
    assert _lora_b_norm(trainer) == 0
    trainer.alignment_steps(train, train._dataset)
    assert len(trainer.alignment_log) == 1
    record = trainer.alignment_log[0]
    assert record["texts"] >= 1 and record["weight_mean"] > 0 and record["kl"] == pytest.approx(0.0, abs=1e-5)
    assert _lora_b_norm(trainer) > 0  # the LLM (LoRA) was updated (Eq. 8)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, rec_before[k])]
    assert changed  # the recommender was updated (Eq. 9)
    assert torch.equal(model.knowledge_vectors, base_vectors)  # sampled knowledge is an override only

    # Phase C + RecBole's training: aligned knowledge in the model, adapter saved beside the checkpoint.
    trainer.regenerate_knowledge(train._dataset)
    trainer.aligned = True
    best, _ = trainer.fit(train, valid, saved=True)
    assert trainer.adapter_version.startswith("lora-")
    lora_file = adapter_path(trainer.saved_model_file)
    assert os.path.isfile(lora_file) and os.path.isfile(trainer.saved_model_file)
    saved = load_file(lora_file)
    assert saved and all("lora_" in k for k in saved)
    result = trainer.evaluate(test, load_best_model=True)
    assert "ndcg@5" in result


def test_fit_runs_all_phases(tmp_path, shared_knowledge):
    from recbole_llm.seralm.alignment.trainer import AlignmentTrainer

    config = tiny_config("SASRecSeRALM", tmp_path, knowledge_cache_dir=shared_knowledge, align_warmup_epochs=1,
                         alignment_steps=2, refresh_every=1, align_batch_size=5,
                         frozen_base_cache_dir=os.path.join(shared_knowledge, "frozen_base"))
    _, train, valid, _ = tiny_data(config)
    model = tiny_model(config, train)
    trainer = AlignmentTrainer(config, model)
    trainer.fit(train, valid, saved=False)
    assert trainer.aligned and len(trainer.alignment_log) == 2
    assert all(r["instances"] == 5 and 1 <= r["texts"] <= 5 for r in trainer.alignment_log)
    assert trainer.generator_refresh_steps == [0, 1]
    assert [r["snapshot_step"] for r in trainer.alignment_log] == [0, 1]  # sync + refresh 1 = Algorithm 1
    # the aligned knowledge texts were generated and cached under the adapter's version
    import json

    versions = set()
    for name in os.listdir(shared_knowledge):
        if name.startswith("knowledge-") and name.endswith(".json"):
            with open(os.path.join(shared_knowledge, name)) as f:
                versions.add(json.load(f)["meta"]["adapter_version"])
    assert trainer.adapter_version in versions and "base" in versions


def test_alignment_false_is_plain_recbole_training(tmp_path, shared_knowledge):
    from recbole.trainer import Trainer

    from recbole_llm.core.safe_trainer import safe_trainer_class
    from recbole_llm.seralm.alignment.trainer import AlignmentTrainer

    results = []
    for trainer_class in (AlignmentTrainer, safe_trainer_class(Trainer)):
        config = tiny_config("SASRecSeRALM", tmp_path / trainer_class.__name__, knowledge_cache_dir=shared_knowledge,
                             alignment=False, epochs=2)
        _, train, valid, _ = tiny_data(config)
        model = tiny_model(config, train)
        trainer = trainer_class(config, model)
        best, result = trainer.fit(train, valid, saved=False)
        results.append((best, result, {k: v.clone() for k, v in model.state_dict().items()}, trainer))
    (best_a, result_a, state_a, aligned), (best_b, result_b, state_b, _) = results
    assert best_a == best_b and result_a == result_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert aligned.llm is None and not aligned.alignment_log


def test_frozen_base_is_the_variants_base_trained_once_and_cached(tmp_path):
    from recbole.model.sequential_recommender.caser import Caser

    from recbole_llm.seralm.alignment.trainer import base_model_name, load_frozen_base

    cache = tmp_path / "frozen"
    config = tiny_config("CaserSeRALM", tmp_path, frozen_base_cache_dir=str(cache))
    dataset, _, _, _ = tiny_data(config)
    first = load_frozen_base(config, dataset)
    assert type(first) is Caser and not any(p.requires_grad for p in first.parameters())
    files = listdir_without_locks(cache)
    assert len(files) == 1 and files[0].startswith("Caser-tinyalign-")
    stamp = os.path.getmtime(cache / files[0])
    second = load_frozen_base(config, dataset)  # from the cache, not retrained
    assert os.path.getmtime(cache / files[0]) == stamp
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    missing = tiny_config("CaserSeRALM", tmp_path, frozen_base_checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="frozen_base_checkpoint"):
        load_frozen_base(missing, dataset)
    assert base_model_name(tiny_config("LightSANsSeRALM", tmp_path)) == "LightSANs"


def test_base_warm_start_starts_the_variant_at_the_trained_base(tmp_path, shared_knowledge):
    """base_warm_start: the variant's base weights are the cached frozen base's, so with the fusion at [I ; 0] it
    scores exactly as the trained base before its first step; split refuses (its ID embedding is narrower)."""
    from recbole_llm.core.errors import ConfigError
    from recbole_llm.seralm.alignment.trainer import AlignmentTrainer, load_frozen_base

    config = tiny_config("SASRecSeRALM", tmp_path, knowledge_cache_dir=shared_knowledge, alignment=False,
                         base_warm_start=True, frozen_base_cache_dir=str(tmp_path / "frozen"))
    dataset, train, valid, test = tiny_data(config)
    model = tiny_model(config, train)
    trainer = AlignmentTrainer(config, model)
    trainer.warm_start_from_base(dataset)
    base = load_frozen_base(config, dataset)
    model.eval()
    batch = next(iter(test))[0]
    assert torch.equal(model.full_sort_predict(batch), base.full_sort_predict(batch))
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {config["learning_rate"]}
    slower = tiny_config("SASRecSeRALM", tmp_path, knowledge_cache_dir=shared_knowledge, alignment=False,
                         base_warm_start=True, warm_start_learning_rate=1e-5)
    assert {g["lr"] for g in AlignmentTrainer(slower, model).optimizer.param_groups} == {1e-5}
    split = tiny_config("SASRecSeRALM", tmp_path, knowledge_cache_dir=shared_knowledge, alignment=False,
                        base_warm_start=True, knowledge_concat="split")
    with pytest.raises(ConfigError, match="knowledge_concat: project"):
        AlignmentTrainer(split, tiny_model(split, train)).fit(train, valid, saved=False)


@pytest.mark.parametrize("epoch_scores, kept", [((0.4,), -1), ((0.6,), 0)])
def test_a_warm_start_is_validated_first_and_kept_unless_an_epoch_beats_it(tmp_path, shared_knowledge, epoch_scores,
                                                                          kept):
    """base_warm_start: the trained base is validated before the first epoch and saved as the best (epoch -1); an
    epoch replaces it only by validating better, so evaluate() then scores the base's own weights."""
    from recbole_llm.seralm.alignment.trainer import AlignmentTrainer, load_frozen_base

    config = tiny_config("SASRecSeRALM", tmp_path, knowledge_cache_dir=shared_knowledge, alignment=False,
                         base_warm_start=True, frozen_base_cache_dir=str(tmp_path / "frozen"), epochs=1)
    dataset, train, valid, test = tiny_data(config)
    model = tiny_model(config, train)
    trainer = AlignmentTrainer(config, model)
    scores = iter((0.5,) + epoch_scores)  # the warm start validates at 0.5, then each epoch as given
    trainer._valid_epoch = lambda *a, **k: (lambda s: (s, {"ndcg@10": s}))(next(scores))

    def perturb(*args, **kwargs):  # an epoch that moves the weights, so the kept ones can be told apart
        with torch.no_grad():
            model.item_embedding.id_embedding.weight.add_(1.0)
        return 0.0
    trainer._train_epoch = perturb
    best, _ = trainer.fit(train, valid, saved=True)
    checkpoint = torch.load(trainer.saved_model_file, weights_only=True)
    assert checkpoint["best_epoch"] == kept and best == max((0.5,) + epoch_scores)
    trainer.evaluate(test, load_best_model=True)
    base = load_frozen_base(config, dataset)
    model.eval()
    batch = next(iter(test))[0]
    assert torch.equal(model.full_sort_predict(batch), base.full_sort_predict(batch)) == (kept == -1)


def test_joint_grounding_encodes_the_item_text_with_its_knowledge(tmp_path, shared_knowledge, monkeypatch):
    from recbole_llm.seralm import knowledge as K

    config = tiny_config("SASRecSeRALM", tmp_path, knowledge_cache_dir=shared_knowledge, knowledge_grounding="joint")
    dataset, _, _, _ = tiny_data(config)
    monkeypatch.setattr(K, "generate_knowledge", lambda *a, **k: [""] + [f"note {i}" for i in range(1, dataset.item_num)])
    items = K.item_source_texts(dataset, config)
    texts = K.knowledge_texts(dataset, config)
    assert texts[0] == "" and texts[1] == f"{items[1]}. note 1" and len(texts) == dataset.item_num
    assert K.ground(items, [2, 3], ["x", " "]) == [f"{items[2]}. x", items[3]]  # no knowledge: the item text alone
    assert K.ground(None, [2], ["x"]) == ["x"]
    plain = tiny_config("SASRecSeRALM", tmp_path, knowledge_cache_dir=shared_knowledge)
    assert K.knowledge_texts(dataset, plain)[1] == "note 1"


def test_alignment_trains_the_text_encoder_jointly_and_keeps_the_aligned_texts(tmp_path, monkeypatch):
    """Paper 4.3: "the text encoder is jointly optimized with the ID-based model". In alignment the generator
    encodes s with the snapshot's encoder, Line 5 encodes the same s with the model's encoder (with gradients), and
    phase C re-encodes the aligned texts with the fine-tuned encoder; the texts travel in the state_dict."""
    from recbole_llm.core.checkpoint import atomic_torch_save, load_checkpoint
    from recbole_llm.llm.lora import build_lora_llm
    from recbole_llm.seralm import knowledge as K
    from recbole_llm.seralm.alignment.trainer import AlignmentTrainer

    config = tiny_config("SASRecSeRALM", tmp_path, train_text_encoder=True, alignment_steps=2, refresh_every=1,
                         align_batch_size=5, learning_rate=0.01,
                         frozen_base_cache_dir=str(tmp_path / "frozen_base"))
    dataset, train, valid, _ = tiny_data(config)
    # Base knowledge with words in it (the tiny LLM's greedy answers are empty, i.e. zero vectors).
    K.generate_knowledge(dataset, config, generate_fn=lambda prompts: [f"base: {p[-60:]}" for p in prompts],
                         progress=False)
    model = tiny_model(config, train)
    assert all(t.startswith("base: ") for t in model.knowledge_texts[1:])
    trainer = AlignmentTrainer(config, model)
    trainer.llm, trainer.tokenizer = build_lora_llm(config, device=trainer.device)
    encoder_before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    calls = []
    encode = type(model).encode_knowledge_texts

    def spy(self, texts):
        calls.append((self is model, torch.is_grad_enabled(), list(texts)))
        return encode(self, texts)

    monkeypatch.setattr(type(model), "encode_knowledge_texts", spy)
    trainer.alignment_steps(train, train._dataset)
    generator_texts = [texts for own, grad, texts in calls if not own]
    line5_texts = [texts for own, grad, texts in calls if own and grad]
    assert len(generator_texts) == 2 and all(not grad for own, grad, _ in calls if not own)
    assert all(texts in line5_texts for texts in generator_texts)  # the very samples, now with gradients
    assert any(t.strip() for texts in generator_texts for t in texts)  # non-empty samples: a real gradient path
    assert any(not torch.equal(v, encoder_before[k]) for k, v in model.text_encoder.state_dict().items())

    generate = K.generate_knowledge
    monkeypatch.setattr(K, "generate_knowledge", lambda dataset, cfg, llm=None, tokenizer=None, **kwargs: generate(
        dataset, cfg, generate_fn=lambda prompts: [f"aligned: {p[-60:]}" for p in prompts], **kwargs))
    trainer.regenerate_knowledge(train._dataset)
    aligned_texts = list(model.knowledge_texts)
    assert aligned_texts[0] == "" and all(t.startswith("aligned: ") for t in aligned_texts[1:])
    model.eval()
    with torch.no_grad():
        own = encode(model, aligned_texts[1:])
    assert torch.allclose(model.knowledge_vectors[1:], own, atol=1e-6)  # the fine-tuned encoder's vectors
    original = K.encode_knowledge(aligned_texts, config, progress=False)
    assert not torch.allclose(model.knowledge_vectors.cpu(), original.cpu(), atol=1e-6)  # not the original encoder's

    path = str(tmp_path / "aligned.pth")
    atomic_torch_save({"state_dict": model.state_dict()}, path)
    reload_config = tiny_config("SASRecSeRALM", tmp_path, train_text_encoder=True, knowledge_source="checkpoint",
                                knowledge_text_dim=model.knowledge_vectors.size(1))
    reloaded = tiny_model(reload_config, train)
    reloaded.load_state_dict(load_checkpoint(path)["state_dict"])
    assert reloaded.knowledge_texts == aligned_texts
    assert torch.equal(reloaded.knowledge_vectors, model.knowledge_vectors)
    state = model.state_dict()
    state["knowledge_text_store._extra_state"] = {"texts": aligned_texts[:3]}
    with pytest.raises(ValueError, match="knowledge texts must be a list of"):
        reloaded.load_state_dict(state)

    trainer.aligned = True
    trainer.fit(train, valid, saved=False)  # RecBole's training re-encodes the aligned texts, not the base ones
    assert model.knowledge_texts == aligned_texts
    with torch.no_grad():
        assert torch.allclose(model.knowledge_vectors[1:], encode(model, aligned_texts[1:]), atol=1e-6)


def test_ray_generator_shares_the_trainers_gpu_and_dtype_by_default(tmp_path, shared_knowledge, monkeypatch):
    """Ray hides GPUs from an actor that reserves none; and the actor's original-LLM log-probs enter the KL, so
    they must have the trainer's precision."""
    from recbole_llm.llm.lora import build_lora_llm
    from recbole_llm.seralm.alignment import trainer as module

    seen = {}
    monkeypatch.setattr(module, "RayGenerator", lambda *args, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(module, "KnowledgeEncoder", lambda *args, **kwargs: None)
    config = tiny_config("SASRecSeRALM", tmp_path, knowledge_cache_dir=shared_knowledge, generator_mode="ray")
    assert config["generator_num_gpus"] is None  # the YAML default: auto
    _, train, _, _ = tiny_data(config)
    trainer = module.AlignmentTrainer(config, tiny_model(config, train))
    trainer.llm, trainer.tokenizer = build_lora_llm(config, dtype=torch.bfloat16)
    trainer.make_generator(train._dataset, frozen_base=None)
    assert seen["num_gpus"] == 0 and seen["dtype"] == torch.bfloat16  # on the CPU: no GPU to share
    trainer.device = torch.device("cuda")  # what a CUDA run has (nothing is moved in this test)
    trainer.make_generator(train._dataset, frozen_base=None)
    assert seen["num_gpus"] == 0.5


def test_each_instance_is_scored_with_its_own_samples_only(tmp_path, shared_knowledge):
    """Eq. 6 is per instance: another row's sampled text (of a candidate every row scores) must not move it."""
    from recbole_llm.seralm.sampler import per_instance_log_prob, select_history_items

    config = tiny_config("SASRecSeRALM", tmp_path, knowledge_cache_dir=shared_knowledge)
    _, train, _, _ = tiny_data(config)
    model = tiny_model(config, train).eval()
    with torch.no_grad():  # the project fusion starts at [I ; 0] (knowledge invisible): give the knowledge a weight
        model.item_embedding.fusion.weight[:, model.item_embedding.embedding_dim:].normal_()
    batch = next(iter(train))
    items = select_history_items(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], 1)
    a, b = next((r, s) for r in range(len(items)) for s in range(len(items)) if items[r] and items[s]
                and items[r] != items[s])
    sub = batch[torch.tensor([a, b])]
    width = model.knowledge_vectors.size(1)
    torch.manual_seed(0)
    vectors = {items[a][0]: torch.randn(width), items[b][0]: torch.randn(width)}
    with torch.no_grad():
        first = per_instance_log_prob(model, sub, [items[a], items[b]], vectors)
        alone = model.target_log_prob(sub[torch.tensor([1])], knowledge_override={items[b][0]: vectors[items[b][0]]})
        vectors[items[a][0]] = vectors[items[a][0]] * 10  # only row a's sample changes
        second = per_instance_log_prob(model, sub, [items[a], items[b]], vectors)
    assert second[1] == pytest.approx(first[1].item(), abs=1e-6) and first[1] == pytest.approx(alone.item(), abs=1e-6)
    assert second[0] != pytest.approx(first[0].item(), abs=1e-6)  # row a does see its own sample


def test_phase_c_puts_the_aligned_knowledge_in_the_model_and_training_keeps_it(tmp_path, monkeypatch):
    """The tiny LLM writes empty texts, so its base and aligned knowledge are both zero; an adapter-dependent
    stand-in makes phase C's replacement visible."""
    from recbole_llm.llm.lora import build_lora_llm
    from recbole_llm.seralm import knowledge as K
    from recbole_llm.seralm.alignment.trainer import AlignmentTrainer

    config = tiny_config("SASRecSeRALM", tmp_path, frozen_base_cache_dir=str(tmp_path / "frozen_base"))
    _, train, valid, _ = tiny_data(config)
    model = tiny_model(config, train)
    trainer = AlignmentTrainer(config, model)
    trainer.llm, trainer.tokenizer = build_lora_llm(config, device=trainer.device)
    base = model.knowledge_vectors.clone()
    generate = K.generate_knowledge

    def aligned_llm(dataset, cfg, llm=None, tokenizer=None, **kwargs):
        assert kwargs["adapter_version"].startswith("lora-")
        return generate(dataset, cfg, generate_fn=lambda prompts: [f"aligned: {p[-60:]}" for p in prompts], **kwargs)

    monkeypatch.setattr(K, "generate_knowledge", aligned_llm)
    trainer.regenerate_knowledge(train._dataset)
    aligned = model.knowledge_vectors.clone()
    assert aligned[1:].abs().sum(dim=1).gt(0).all() and not torch.equal(aligned, base)
    trainer.aligned = True
    trainer.fit(train, valid, saved=False)  # RecBole's training and evaluation on the aligned knowledge
    assert torch.equal(model.knowledge_vectors, aligned)
