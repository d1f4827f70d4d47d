"""SeRALM knowledge: prompt, resumable text cache, cache keys, encoded-vector cache, and one short run
with the real bundled SmolLM2 + MiniLM."""

import json
import os
import warnings

import pytest
import torch

import recbole_llm  # noqa: F401
from recbole_llm.llm.prompts import knowledge_prompt
from recbole_llm.seralm import knowledge as K

from tests.helpers_foundation import start_lock_holder
from tests.helpers_seralm import DATASET, N_ITEMS, FakeGenerator, fake_knowledge, tiny_config_dict

torch.set_num_threads(1)


@pytest.fixture
def tiny(tmp_path):
    """(config, dataset) of the 12-item dataset with caches in tmp_path."""
    from recbole.data import create_dataset

    from recbole_llm.core.config import Config

    config = Config(model="SASRecSeRALM", dataset=DATASET, config_dict=tiny_config_dict(tmp_path), cmd_args=[])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config, create_dataset(config)


def cache_files(config):
    return sorted(os.listdir(K.knowledge_cache_dir(config)))


def test_prompt_fills_item_text_and_asks_for_audience():
    prompt = knowledge_prompt("Glass Beaker (brand: Pyrex)")
    assert "Glass Beaker (brand: Pyrex)" in prompt and "describe" in prompt and "users would like" in prompt
    with pytest.raises(ValueError, match="text attributes"):
        knowledge_prompt("  ")


def test_round_trip_and_no_regeneration(tiny, caplog):
    config, dataset = tiny
    gen = FakeGenerator()
    texts = K.generate_knowledge(dataset, config, generate_fn=gen, progress=False)
    source = K.item_source_texts(dataset, config)
    assert len(texts) == N_ITEMS + 1 and texts[0] == ""
    assert texts[1:] == [fake_knowledge(t) for t in source[1:]]
    assert sum(len(b) for b in gen.batches) == N_ITEMS and max(len(b) for b in gen.batches) == 4
    # consolidated file only: the partial JSONL is gone
    assert [f for f in cache_files(config) if f.endswith(".jsonl")] == []
    again = FakeGenerator()
    with caplog.at_level("INFO", logger="recbole_llm.seralm.knowledge"):
        assert K.generate_knowledge(dataset, config, generate_fn=again, progress=False) == texts
    assert again.batches == []
    # a run that reads cached knowledge says so, and from which file
    [final] = [f for f in cache_files(config) if f.startswith("knowledge-") and f.endswith(".json")]
    path = os.path.join(K.knowledge_cache_dir(config), final)
    assert f"Knowledge texts of {N_ITEMS} items (LLM adapter 'base') read from {path}" in caplog.text


def test_resume_after_interruption_generates_only_the_rest(tiny):
    config, dataset = tiny
    killed = FakeGenerator(fail_on_batch=2)  # 2 batches of 4 finished, then the process "dies"
    with pytest.raises(KeyboardInterrupt):
        K.generate_knowledge(dataset, config, generate_fn=killed, progress=False)
    partial = [f for f in cache_files(config) if f.endswith(".partial.jsonl")]
    assert len(partial) == 1 and not [f for f in cache_files(config) if f.endswith(".json")]
    resumed = FakeGenerator()
    texts = K.generate_knowledge(dataset, config, generate_fn=resumed, progress=False)
    assert sum(len(b) for b in resumed.batches) == N_ITEMS - 8
    first = {p for b in killed.batches for p in b}
    assert not first & {p for b in resumed.batches for p in b}
    # equal to an uninterrupted run in a fresh cache
    config["knowledge_cache_dir"] = config["knowledge_cache_dir"] + "-fresh"
    assert K.generate_knowledge(dataset, config, generate_fn=FakeGenerator(), progress=False) == texts


def test_truncated_last_line_is_ignored(tiny):
    config, dataset = tiny
    with pytest.raises(KeyboardInterrupt):
        K.generate_knowledge(dataset, config, generate_fn=FakeGenerator(fail_on_batch=2), progress=False)
    path = os.path.join(K.knowledge_cache_dir(config), [f for f in cache_files(config) if f.endswith(".jsonl")][0])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"ids": [99, 98], "texts": ["half a li')  # killed in the middle of a write
    resumed = FakeGenerator()
    texts = K.generate_knowledge(dataset, config, generate_fn=resumed, progress=False)
    assert sum(len(b) for b in resumed.batches) == N_ITEMS - 8
    assert len(texts) == N_ITEMS + 1 and all(texts[1:])


def test_corrupt_middle_line_is_a_clear_error(tiny):
    config, dataset = tiny
    with pytest.raises(KeyboardInterrupt):
        K.generate_knowledge(dataset, config, generate_fn=FakeGenerator(fail_on_batch=2), progress=False)
    path = os.path.join(K.knowledge_cache_dir(config), [f for f in cache_files(config) if f.endswith(".jsonl")][0])
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(["garbage\n"] + lines)
    with pytest.raises(ValueError, match="line 1 is corrupt"):
        K.generate_knowledge(dataset, config, generate_fn=FakeGenerator(), progress=False)


def test_cache_key_changes_with_llm_adapter_and_settings(tiny, tmp_path):
    from recbole_llm.llm.tiny import make_tiny_llm_dir

    config, dataset = tiny
    K.generate_knowledge(dataset, config, generate_fn=FakeGenerator(), progress=False)
    for change in ({"adapter_version": "step-50"}, {"knowledge_max_new_tokens": 5}, {"llm_num_layers": 1},
                   {"llm_path": make_tiny_llm_dir(tmp_path / "other-llm", seed=1)}):
        saved = {k: config[k] for k in change if k != "adapter_version"}
        for k, v in change.items():
            if k != "adapter_version":
                config[k] = v
        gen = FakeGenerator()
        K.generate_knowledge(dataset, config, adapter_version=change.get("adapter_version", "base"),
                             generate_fn=gen, progress=False)
        assert sum(len(b) for b in gen.batches) == N_ITEMS, change
        for k, v in saved.items():
            config[k] = v
    # back to the original settings: served from cache
    gen = FakeGenerator()
    K.generate_knowledge(dataset, config, generate_fn=gen, progress=False)
    assert gen.batches == []
    finals = [f for f in cache_files(config) if f.startswith("knowledge-") and f.endswith(".json")]
    assert len(finals) == 5
    with open(os.path.join(K.knowledge_cache_dir(config), finals[0]), encoding="utf-8") as f:
        meta = json.load(f)["meta"]
    assert meta["dataset"] == DATASET and {"llm_fingerprint", "adapter_version", "max_new_tokens"} <= set(meta)


def test_encoded_vectors_cache_round_trip(tiny, monkeypatch, caplog):
    from safetensors.torch import load_file

    from tests.helpers_llm import tiny_encoder

    config, dataset = tiny
    texts = ["", "a lab kit", "", "glass beaker set"]
    vectors = K.encode_knowledge(texts, config, encoder=tiny_encoder(), progress=False)
    assert vectors.shape == (4, 32) and vectors.dtype == torch.float32
    assert torch.all(vectors[0] == 0) and torch.all(vectors[2] == 0)  # padding, empty knowledge
    assert torch.allclose(vectors[[1, 3]].norm(dim=1), torch.ones(2), atol=1e-5)
    path = K.vectors_path(texts, config)
    assert torch.equal(load_file(path)["vectors"], vectors)
    with open(path, "rb") as f:  # the safetensors header is plain JSON: nothing pickled
        assert b"vectors" in f.read(200)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder must not be loaded on a cache hit")

    monkeypatch.setattr("recbole_llm.llm.loader.load_text_encoder", no_encoder)
    with caplog.at_level("INFO", logger="recbole_llm.seralm.knowledge"):
        assert torch.equal(K.encode_knowledge(texts, config, progress=False), vectors)
    assert f"Knowledge vectors of 3 items read from {path}" in caplog.text
    other = K.encode_knowledge(["", "a lab kit", "", "glass beaker set", "x"], config, encoder=tiny_encoder(),
                               progress=False)
    assert other.shape == (5, 32) and torch.allclose(other[:4], vectors, atol=1e-5)


def test_a_second_run_waits_for_the_first_and_reads_its_knowledge(tiny):
    """Two runs that need the same knowledge (parallel run_hyper trials): the second waits for the first's
    build lock, then reads its finished cache instead of generating again into the same resume file."""
    config, dataset = tiny
    key, _ = K.knowledge_key(config["dataset"], K.item_source_texts(dataset, config), config)
    cache = K.KnowledgeCache(K.knowledge_cache_dir(config), key)
    theirs = [""] + [f"written by the first run {i}" for i in range(1, N_ITEMS + 1)]
    finish = ("import json\nfrom recbole_llm.seralm.knowledge import KnowledgeCache\n"
              "KnowledgeCache(args[0], args[1]).finalize(json.loads(args[2]))")
    holder = start_lock_holder(cache.final_path, finish, cache.directory, key, json.dumps(theirs))
    ours = FakeGenerator()
    assert K.generate_knowledge(dataset, config, generate_fn=ours, progress=False) == theirs
    assert ours.batches == [] and holder.wait(timeout=60) == 0


def test_a_second_run_waits_for_the_first_and_reads_its_vectors(tiny):
    config, _ = tiny
    texts = ["", "a lab kit", "glass beaker set"]
    path = K.vectors_path(texts, config)
    finish = ("import torch\nfrom safetensors.torch import save_file\n"
              "save_file({'vectors': torch.full((3, 32), 0.5)}, args[0])")
    holder = start_lock_holder(path, finish, path)

    class NoEncoder:  # unpacked only on a cache miss
        def __iter__(self):
            raise AssertionError("the second run must read the first run's vectors, not encode again")

    vectors = K.encode_knowledge(texts, config, encoder=NoEncoder(), progress=False)
    assert torch.equal(vectors, torch.full((3, 32), 0.5)) and holder.wait(timeout=60) == 0


def test_knowledge_source_item_text_needs_no_llm(tiny, monkeypatch):
    config, dataset = tiny

    def no_llm(*args, **kwargs):
        raise AssertionError("item_text must not load the LLM")

    monkeypatch.setattr("recbole_llm.llm.loader.load_causal_lm", no_llm)
    config["knowledge_source"] = "item_text"
    matrix = K.knowledge_matrix(dataset, config)
    assert matrix.shape == (N_ITEMS + 1, 32) and torch.all(matrix[0] == 0) and torch.all(matrix[1:].norm(dim=1) > 0.5)
    config["knowledge_source"] = "wiki"
    with pytest.raises(ValueError, match="knowledge_source"):
        K.knowledge_matrix(dataset, config)


def test_real_smollm2_and_minilm_three_items(tmp_path):
    """The bundled models through the real path (prompt, chat template, batched greedy generation, cache,
    MiniLM encoding) on a three-item dataset, few tokens."""
    from recbole.data import create_dataset

    from recbole_llm.core.config import Config

    config = Config(model="SASRecSeRALM", dataset=DATASET, cmd_args=[], config_dict=tiny_config_dict(
        tmp_path, n_items=3, llm_path=None, encoder_path=None, knowledge_max_new_tokens=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = create_dataset(config)
    assert dataset.item_num == 4
    matrix = K.knowledge_matrix(dataset, config)
    texts = K.generate_knowledge(dataset, config, generate_fn=FakeGenerator(fail_on_batch=0))  # cached: no call
    assert texts[0] == "" and all(isinstance(t, str) and t.strip() for t in texts[1:])
    assert all(t != fake_knowledge(s) for t, s in zip(texts[1:], K.item_source_texts(dataset, config)[1:]))
    assert matrix.shape == (4, 384) and torch.all(matrix[0] == 0)
    assert torch.allclose(matrix[1:].norm(dim=1), torch.ones(3), atol=1e-4)


def test_shared_prefix_generation_equals_plain_generation():
    """Encoding the common prompt prefix once gives exactly the greedy output of whole prompts."""
    from recbole_llm.llm.generate import generate_with_ids
    from recbole_llm.llm.prefix_generate import prefix_shared_generate
    from recbole_llm.llm.prompts import knowledge_prompt_parts
    from tests.helpers_llm import TINY_TEXTS, tiny_llm

    llm, tokenizer = tiny_llm()
    prompts = K.knowledge_prompts(TINY_TEXTS, tokenizer)
    prefix, tail = knowledge_prompt_parts(tokenizer)
    assert all(p == prefix + " " + t + tail for p, t in zip(prompts, TINY_TEXTS))
    suffixes = [p[len(prefix):] for p in prompts]
    for penalty in (1.0, 5.0):
        # token ids: the random tiny model often writes special tokens only, which decode to ""
        shared = prefix_shared_generate(llm, tokenizer, prefix, suffixes, max_new_tokens=6,
                                        repetition_penalty=penalty, return_ids=True)
        plain = [generate_with_ids(llm, tokenizer, [p], max_new_tokens=6, batch_size=1, repetition_penalty=penalty,
                                   progress=False)[0]["gen_ids"].tolist() for p in prompts]
        assert shared == plain
    assert len({t for ids in plain for t in ids}) > 1  # the strong penalty makes the rows non-trivial
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in plain]
    config = {"dataset": DATASET, "knowledge_max_new_tokens": 6, "knowledge_repetition_penalty": 5.0}
    assert K._default_generate_fn(llm, tokenizer, config)(prompts) == texts


def test_shared_prefix_generation_of_the_aligned_lora_llm_uses_the_forwards_cache_argument():
    """Phase C regenerates knowledge with the peft-wrapped aligned LLM. Its key/value cache goes in under the
    forward's own argument name (transformers 5 renamed past_key_values to cache and warns on the old one), and
    the output equals plain greedy generation with the adapter on."""
    from peft import LoraConfig, get_peft_model

    from recbole_llm.llm.generate import generate_with_ids
    from recbole_llm.llm.prefix_generate import prefix_shared_generate
    from recbole_llm.llm.prompts import knowledge_prompt_parts
    from tests.helpers_llm import TINY_TEXTS, tiny_llm

    llm, tokenizer = tiny_llm()
    torch.manual_seed(0)
    lora = get_peft_model(llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                          init_lora_weights=False))  # random B: the adapter changes the output
    prompts = K.knowledge_prompts(TINY_TEXTS, tokenizer)
    prefix = knowledge_prompt_parts(tokenizer)[0]
    suffixes = [p[len(prefix):] for p in prompts]

    def shared_ids():
        return prefix_shared_generate(lora, tokenizer, prefix, suffixes, max_new_tokens=6, repetition_penalty=5.0,
                                      return_ids=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        shared = shared_ids()
    plain = [generate_with_ids(lora, tokenizer, [p], max_new_tokens=6, batch_size=1, repetition_penalty=5.0,
                               progress=False)[0]["gen_ids"].tolist() for p in prompts]
    assert shared == plain
    with lora.disable_adapter():  # the comparison means something only if the adapter was on in both
        assert shared_ids() != shared
