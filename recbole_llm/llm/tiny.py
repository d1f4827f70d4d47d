"""Tiny randomly initialised models for tests: a Llama decoder and a BERT encoder.

Both come with a real fast tokenizer built offline with the ``tokenizers`` library, so every code
path (tokenise, pad, chat template, generate, encode) runs exactly as with the bundled models, only
much faster. Weights are seeded, so a directory built twice holds the same model.
"""

import atexit
import functools
import shutil
import string
import tempfile

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

# Short ChatML-like template: enough to exercise build_chat_prompts without any hub file.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<s>{{ message['role'] }}: {{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)

# A small built-in corpus: letters, digits, punctuation and words typical of product titles.
_CORPUS_WORDS = (
    "the a an and or of for with in on to by from is are this that it you your user item items "
    "recommend history purchased bought next title brand category description price review rating "
    "science lab kit microscope glass beaker tube set pack pcs inch mm cm black white blue red green "
    "steel plastic digital thermometer scale magnet battery cable light lamp book books game toy "
    "kitchen home office tools industrial scientific supplies safety gloves mask paper pen pencil "
    "answer question describe who likes likely people who would enjoy it because great good quality"
)


def _corpus():
    lines = [_CORPUS_WORDS, string.ascii_letters, string.digits, string.punctuation]
    lines += [" ".join(_CORPUS_WORDS.split()[i:i + 8]) for i in range(0, len(_CORPUS_WORDS.split()), 8)]
    return lines


def build_tiny_tokenizer(vocab_size=400, chat_template=CHAT_TEMPLATE):
    """A byte-level BPE fast tokenizer: any UTF-8 text tokenises (no unknowns), built in milliseconds."""
    # heavy: transformers takes ~1 s to import; a test that imports this module may build no model
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)
    tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_llm_dir(path, hidden_size=32, num_layers=2, num_heads=2, vocab_size=400, seed=0):
    """Save a seeded random LlamaForCausalLM + tokenizer into ``path``; returns ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy: transformers, ~1 s to import

    tokenizer = build_tiny_tokenizer(vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    _save_quietly(model, tokenizer, path)
    return str(path)


def make_tiny_encoder_dir(path, hidden_size=32, num_layers=2, num_heads=2, vocab_size=400, seed=0):
    """Save a seeded random BertModel + tokenizer into ``path``; returns ``path``."""
    from transformers import BertConfig, BertModel  # heavy: transformers, ~1 s to import

    tokenizer = build_tiny_tokenizer(vocab_size=vocab_size, chat_template=None)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    _save_quietly(model, tokenizer, path)
    return str(path)


def _save_quietly(model, tokenizer, path):
    from transformers.utils import logging as hf_logging  # heavy: transformers, ~1 s to import

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in test output
    try:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    finally:
        hf_logging.enable_progress_bar()


def _process_temp_dir(prefix):
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.lru_cache(maxsize=None)
def tiny_llm_dir(**kwargs):
    """A tiny LLM directory built once per process (removed at exit); kwargs as make_tiny_llm_dir."""
    return make_tiny_llm_dir(_process_temp_dir("recbole_llm_tiny_llm_"), **kwargs)


@functools.lru_cache(maxsize=None)
def tiny_encoder_dir(**kwargs):
    """A tiny encoder directory built once per process (removed at exit); kwargs as make_tiny_encoder_dir."""
    return make_tiny_encoder_dir(_process_temp_dir("recbole_llm_tiny_enc_"), **kwargs)
