"""SeRALM's generator job: refresh schedule, stale snapshots between refreshes, and the Ray actor
returning the same batches as the same-process generator."""

import math

import pytest
import torch

from tests.helpers_alignment import set_threads, tiny_config, tiny_data, tiny_model

set_threads()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny LoRA LLM, SASRecSeRALM, an (untrained) SASRec as frozen base, the encoder, prompts, a batch."""
    from recbole_llm.core.lookup import get_model
    from recbole_llm.llm.lora import build_lora_llm
    from recbole_llm.seralm.sampler import KnowledgeEncoder, generator_options, item_prompts

    tmp = tmp_path_factory.mktemp("generator")
    config = tiny_config("SASRecSeRALM", tmp)
    dataset, train, _, _ = tiny_data(config)
    model = tiny_model(config, train)
    base_config = tiny_config("SASRec", tmp)
    frozen_base = get_model("SASRec")(base_config, train._dataset)
    llm, tokenizer = build_lora_llm(config, device="cpu")
    prompts = item_prompts(dataset, config, tokenizer)
    options = generator_options(config)
    batch = next(iter(train))
    return dict(config=config, model=model, frozen_base=frozen_base, llm=llm, tokenizer=tokenizer, prompts=prompts,
                options=options, encode=KnowledgeEncoder(config, device="cpu"), batch=batch, n_items=dataset.item_num,
                train=train, tmp=tmp)


def _snapshot(parts, model=None):
    from recbole_llm.llm.lora import lora_state
    from recbole_llm.seralm.sampler import cpu_state

    return lambda: (lora_state(parts["llm"]), cpu_state((model or parts["model"]).state_dict()))


def _sync(parts, refresh_every, model=None):
    from recbole_llm.seralm.sampler import SyncGenerator

    return SyncGenerator(parts["llm"], parts["tokenizer"], parts["prompts"], model or parts["model"],
                         parts["frozen_base"], parts["encode"], parts["options"], refresh_every)


def test_refresh_happens_every_n_steps(parts):
    generator = _sync(parts, refresh_every=3)
    calls = []
    for step in range(10):
        generator.maybe_refresh(step, lambda: calls.append(1) or _snapshot(parts)())
    assert generator.refresh_steps == [0, 3, 6, 9]
    assert len(calls) == 4  # snapshots are only built when sent
    with pytest.raises(ValueError, match="refresh_every"):
        _sync(parts, refresh_every=0)


def test_sample_fields_and_shapes(parts):
    generator = _sync(parts, refresh_every=1)
    generator.maybe_refresh(0, _snapshot(parts))
    generator.submit(parts["batch"], seed=1)
    sample = generator.next()
    batch_size = parts["batch"]["item_id"].size(0)
    n_texts = len(sample["items"])
    assert n_texts >= 1 and len(sample["texts"]) == len(sample["gen_ids"]) == len(sample["prompt_ids"]) == n_texts
    assert sample["knowledge"].shape == (n_texts, parts["model"].knowledge_vectors.size(1))
    assert sample["membership"].shape == (batch_size, n_texts)
    assert torch.all(sample["membership"].sum(1) == 1)  # align_history_items: 1 -> one text per instance
    assert sample["logp_rec_s"].shape == sample["logp_rec_base"].shape == (batch_size,)
    assert torch.all(sample["logp_rec_s"] < 0) and torch.all(sample["logp_rec_base"] < 0)
    assert [len(t) for t in sample["orig_token_logps"]] == [len(g) for g in sample["gen_ids"]]
    # the last history item of every instance is among the sampled items
    seq, length = parts["batch"]["item_id_list"], parts["batch"]["item_length"]
    last = {int(seq[b, int(length[b]) - 1]) for b in range(batch_size)}
    assert last == set(sample["items"])


def test_snapshot_is_stale_between_refreshes(parts):
    model, llm = parts["model"], parts["llm"]
    rec_saved = {k: v.clone() for k, v in model.state_dict().items()}
    lora_saved = {n: p.detach().clone() for n, p in llm.named_parameters() if "lora_" in n}
    generator = _sync(parts, refresh_every=3)
    try:
        samples = []
        for step in range(4):
            generator.maybe_refresh(step, _snapshot(parts))
            generator.submit(parts["batch"], seed=7)  # same batch, same seed: differences come from parameters
            samples.append(generator.next())
            if step == 0:
                # The trainer changes both models right after the step-0 refresh.
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        p.zero_()  # all scores equal: p(y|x,s) = 1 / n_items
                    for name, p in llm.named_parameters():
                        if "lora_B" in name:
                            p.normal_(0, 5.0)
        uniform = -math.log(parts["n_items"])
        for step in (1, 2):  # old snapshot: nothing of the change is visible
            assert torch.equal(samples[step]["logp_rec_s"], samples[0]["logp_rec_s"])
            assert all(torch.equal(a, b) for a, b in zip(samples[step]["gen_ids"], samples[0]["gen_ids"]))
            assert samples[step]["snapshot_step"] == 0
            assert samples[step]["snapshot_digest"] == samples[0]["snapshot_digest"]
        assert not torch.allclose(samples[0]["logp_rec_s"], torch.full_like(samples[0]["logp_rec_s"], uniform))
        # step 3: refreshed, the new parameters are used
        assert samples[3]["snapshot_step"] == 3 and samples[3]["snapshot_digest"] != samples[0]["snapshot_digest"]
        assert torch.allclose(samples[3]["logp_rec_s"], torch.full_like(samples[3]["logp_rec_s"], uniform), atol=1e-5)
        assert any(not torch.equal(a, b) for a, b in zip(samples[3]["gen_ids"], samples[0]["gen_ids"]))
        # generating with the snapshot never leaves the snapshot's values in the trainer's LLM
        assert any(not torch.equal(p, lora_saved[n]) for n, p in llm.named_parameters() if "lora_B" in n)
    finally:
        model.load_state_dict(rec_saved)
        with torch.no_grad():
            for name, p in llm.named_parameters():
                if name in lora_saved:
                    p.copy_(lora_saved[name])


def test_empty_samples_encode_to_zero_as_in_the_knowledge_matrix(parts):
    from recbole_llm.seralm.knowledge import encode_knowledge

    texts = ["", "glass beaker for a lab", "  "]
    vectors = parts["encode"](texts)
    assert torch.all(vectors[0] == 0) and torch.all(vectors[2] == 0)
    cached = encode_knowledge(["", texts[1]], parts["config"], progress=False)  # row 0 there is padding
    assert torch.allclose(vectors[1], cached[1], atol=1e-6)


@pytest.mark.parametrize("trainable_encoder", [False, True], ids=["fixed-encoder", "trained-encoder"])
def test_ray_generator_returns_the_same_batches_as_sync(parts, trainable_encoder):
    """With a trained encoder the snapshot carries it (and the knowledge texts, as extra state) to the actor."""
    ray = pytest.importorskip("ray")
    from recbole_llm.seralm.sampler import RayGenerator

    model = parts["model"]
    if trainable_encoder:
        model = tiny_model(tiny_config("SASRecSeRALM", parts["tmp"], train_text_encoder=True), parts["train"])
        with torch.no_grad():  # an encoder that differs from the original one, as after some training
            for p in model.text_encoder.parameters():
                p.add_(0.05 * torch.randn_like(p))
    sync = _sync(parts, refresh_every=2, model=model)
    ray_was_running = ray.is_initialized()
    try:
        remote = RayGenerator(parts["config"], parts["prompts"], model, parts["frozen_base"], parts["encode"],
                              parts["options"], refresh_every=2, num_cpus=1, prefetch=2)
    except Exception as err:  # pragma: no cover - only where Ray cannot start at all
        pytest.skip(f"ray could not start here: {err}")
    try:
        # Same snapshot for both; the actor built its own LLM from llm_path and got LoRA params only.
        remote.maybe_refresh(0, _snapshot(parts, model))
        sync.maybe_refresh(0, _snapshot(parts, model))
        for seed in (11, 12):
            remote.submit(parts["batch"], seed=seed)  # both queued ahead, computed while we wait on none
        for seed in (11, 12):
            sync.submit(parts["batch"], seed=seed)
            expected, got = sync.next(), remote.next()
            assert set(got) == set(expected)
            assert got["items"] == expected["items"] and got["texts"] == expected["texts"]
            assert all(torch.equal(a, b) for a, b in zip(got["gen_ids"], expected["gen_ids"]))
            for key in ("logp_rec_s", "logp_rec_base", "knowledge", "membership"):
                assert torch.allclose(got[key], expected[key], atol=1e-5), key
            for a, b in zip(got["orig_token_logps"], expected["orig_token_logps"]):
                assert torch.allclose(a, b, atol=1e-5)
            assert got["snapshot_step"] == 0 and got["snapshot_digest"] == expected["snapshot_digest"]
            original = parts["encode"](got["texts"])  # the config's fixed encoder
            assert any(t.strip() for t in got["texts"])
            assert torch.allclose(got["knowledge"], original, atol=1e-5) != trainable_encoder
    finally:
        remote.close()
    assert ray.is_initialized() == ray_was_running  # Ray it started is shut down; a running one is left alone
