"""SeRALM item knowledge: LLM-generated text per item, its sentence vectors, and their on-disk caches.

Pipeline (paper 4.2): item attributes -> knowledge prompt -> LLM text s -> text encoder -> r_s.
Both steps are slow and reusable, so both are cached under ``knowledge_cache_dir``
(default ``<plugin cache>/knowledge/<dataset>``):

- ``knowledge-<key>.partial.jsonl``: one line per finished generation batch ({"ids": [...], "texts": [...]}),
  appended with flush + fsync, so a killed run resumes from the last finished batch (a truncated last
  line is ignored). ``knowledge-<key>.json``: the consolidated texts, written atomically at the end.
  The key covers the dataset (name + digest of the item texts), the LLM (path + file fingerprint, kept
  layers, dtype), the adapter version (e.g. an alignment step), every setting that changes the output and
  the package version.
- ``vectors-<key>.safetensors``: the encoded matrix [n_items, d_text] (row 0, the padding item, is zero),
  keyed by the texts' digest, the encoder's identity and dtype, and the package version.

Nothing here is called at recommendation time: models read the finished matrix at construction.
"""

import hashlib
import json
import logging
import os
import time

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from recbole_llm.core.errors import CorruptFileError
from recbole_llm.core.faults import kill_point
from recbole_llm.core.fileio import atomic_path, build_lock
from recbole_llm.core.fingerprint import package_version
from recbole_llm.core.keys import seralm_get
from recbole_llm.llm.item_text import item_texts
# encode and loader are called through their modules, so tests that monkeypatch them reach these calls
from recbole_llm.llm import bundled, encode, loader
from recbole_llm.llm.device import default_dtype, resolve_device
from recbole_llm.llm.generate import build_chat_prompts, generate_batched
from recbole_llm.llm.lora import build_lora_llm, load_lora_state
from recbole_llm.llm.prefix_generate import prefix_shared_generate
from recbole_llm.llm.prompts import KNOWLEDGE_SYSTEM, knowledge_prompt, knowledge_prompt_parts
from recbole_llm.llm.workers import WorkerPool, set_worker_threads, worker_settings

logger = logging.getLogger(__name__)

KNOWLEDGE_SOURCES = ("llm", "item_text")
GROUNDINGS = ("none", "joint")

def _digest(obj, n=16):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:n]


# --------------------------------------------------------------------------------------------- identity
def file_fingerprint(path):
    """Cheap identity of a model file or directory: names, sizes and the bytes of small/config files.

    Hashing a 13 GB checkpoint would take minutes; names + sizes + the first and last MiB of each weight
    file change whenever the weights are replaced in practice.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    for file in files:
        size = os.path.getsize(file)
        digest.update(f"{os.path.relpath(file, path)}:{size};".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def llm_identity(config):
    """What makes two LLMs generate the same text: file fingerprint and kept layers."""
    path = seralm_get(config, "llm_path")
    if path is None:
        path = bundled.bundled_llm_gguf()
    return {"llm": os.path.basename(os.path.normpath(str(path))), "llm_fingerprint": file_fingerprint(path),
            "llm_num_layers": seralm_get(config, "llm_num_layers")}


def encoder_identity(config):
    path = seralm_get(config, "encoder_path")
    if path is None:
        path = bundled.bundled_encoder_dir()
    return {"encoder": os.path.basename(os.path.normpath(str(path))), "encoder_fingerprint": file_fingerprint(path)}


def compute_dtype(config):
    """The dtype the LLM and the encoder run in on the config's device (bf16/fp16 on CUDA, fp32 on CPU):
    generated text and vectors differ between them, so it is part of both cache keys."""
    device = config["device"] if "device" in config else None
    return str(default_dtype(resolve_device(device))).replace("torch.", "")


def knowledge_cache_dir(config):
    directory = seralm_get(config, "knowledge_cache_dir")
    if directory is None:
        directory = os.path.join(bundled.cache_dir(), "knowledge", str(config["dataset"]))
    return os.path.abspath(os.path.expanduser(str(directory)))


# ---------------------------------------------------------------------------------------- atomic writes
def _atomic_write(path, write):
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see half a file."""
    with atomic_path(path) as tmp:
        write(tmp)


# --------------------------------------------------------------------------------------- text cache
class KnowledgeCache:
    """Generated texts of one (dataset, LLM, adapter, settings) key: a resumable JSONL + a final JSON."""

    def __init__(self, directory, key, meta=None):
        self.directory = directory
        self.key = key
        self.meta = meta or {}
        self.final_path = os.path.join(directory, f"knowledge-{key}.json")
        self.partial_path = os.path.join(directory, f"knowledge-{key}.partial.jsonl")

    def load_final(self):
        """The finished texts (list by item id) or None."""
        if not os.path.isfile(self.final_path):
            return None
        with open(self.final_path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise CorruptFileError(f"Knowledge cache '{self.final_path}' is corrupt ({err}); delete it to "
                                       "regenerate.") from None
        return data["texts"]

    def load_partial(self):
        """{item_id: text} from finished batches. A truncated last line (run killed mid-write) is dropped
        and cut from the file, so the next append starts on a clean line."""
        done = {}
        if not os.path.isfile(self.partial_path):
            return done
        with open(self.partial_path, "rb") as f:
            lines = f.read().split(b"\n")
        good_bytes = 0
        for number, line in enumerate(lines):
            if not line.strip():
                good_bytes += len(line) + 1
                continue
            try:
                record = json.loads(line)
                ids, texts = record["ids"], record["texts"]
                if len(ids) != len(texts):
                    raise ValueError("ids and texts differ in length")
            except (ValueError, KeyError, TypeError) as err:
                if any(rest.strip() for rest in lines[number + 1:]):
                    raise CorruptFileError(f"Knowledge cache '{self.partial_path}' line {number + 1} is corrupt ({err}); "
                                     "delete the file to regenerate.") from None
                logger.warning(f"Ignoring a truncated last line in {self.partial_path} (interrupted run).")
                with open(self.partial_path, "r+b") as f:
                    f.truncate(good_bytes)
                break
            done.update(zip((int(i) for i in ids), texts))
            good_bytes += len(line) + 1
        return done

    def append_batch(self, ids, texts):
        os.makedirs(self.directory, exist_ok=True)
        line = json.dumps({"ids": [int(i) for i in ids], "texts": list(texts)}, ensure_ascii=False)
        with open(self.partial_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finalize(self, texts):
        payload = {"meta": self.meta, "texts": list(texts)}

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(payload, f, ensure_ascii=False)

        _atomic_write(self.final_path, write)
        if os.path.exists(self.partial_path):
            os.remove(self.partial_path)


# --------------------------------------------------------------------------------------- generation
def item_source_texts(dataset, config):
    """The items' own text attributes by internal id ("" for padding), from recbole_llm.llm.item_text."""
    texts = list(item_texts(dataset, config))
    if len(texts) != dataset.item_num:
        raise ValueError(f"item_texts returned {len(texts)} texts for {dataset.item_num} items (incl. padding).")
    return texts


def generation_settings(config):
    # late binding: tests monkeypatch prompts.knowledge_template_digest (a changed wording must change the key)
    from recbole_llm.llm.prompts import knowledge_template_digest

    return {"max_new_tokens": int(seralm_get(config, "knowledge_max_new_tokens")),
            "repetition_penalty": float(seralm_get(config, "knowledge_repetition_penalty")),
            "do_sample": False, "prompt": knowledge_template_digest()}


def knowledge_key(dataset_name, source_texts, config, adapter_version="base"):
    """Cache key and the metadata it summarises (stored in the final file for inspection)."""
    meta = {"dataset": str(dataset_name), "item_texts": _digest(source_texts), **llm_identity(config),
            "llm_dtype": compute_dtype(config), "adapter_version": str(adapter_version),
            **generation_settings(config), "package_version": package_version()}
    return _digest(meta), meta


def knowledge_prompts(source_texts, tokenizer):
    """Chat-formatted knowledge prompts for the given item texts (Figure 3 template)."""
    return build_chat_prompts(tokenizer, [knowledge_prompt(t) for t in source_texts], system=KNOWLEDGE_SYSTEM)


def _default_generate_fn(llm, tokenizer, config):
    """Batched greedy decoding; with ``knowledge_shared_prefix`` the prompts' common prefix (chat header,
    system text, instruction) is encoded once per batch instead of once per item (same tokens, same
    greedy output, ~2x faster on CPU where prefill dominates)."""
    settings = generation_settings(config)
    prefix = knowledge_prompt_parts(tokenizer)[0] if seralm_get(config, "knowledge_shared_prefix") else None

    def generate(prompts):
        if prefix and all(p.startswith(prefix) and len(p) > len(prefix) for p in prompts):
            return prefix_shared_generate(llm, tokenizer, prefix, [p[len(prefix):] for p in prompts],
                                          max_new_tokens=settings["max_new_tokens"],
                                          repetition_penalty=settings["repetition_penalty"])
        return generate_batched(llm, tokenizer, prompts, max_new_tokens=settings["max_new_tokens"],
                                batch_size=len(prompts), repetition_penalty=settings["repetition_penalty"],
                                do_sample=False, progress=False)

    return generate


def load_knowledge_llm(config, device=None):
    """The LLM named by the config (llm_path / llm_num_layers) on ``device``, by default the config's."""
    if device is None:
        device = config["device"] if "device" in config else None
    return loader.load_causal_lm(seralm_get(config, "llm_path"), device=device,
                                 num_layers=seralm_get(config, "llm_num_layers"),
                                 trust_remote_code=bool(seralm_get(config, "llm_trust_remote_code")))


def generate_knowledge(dataset, config, llm=None, tokenizer=None, adapter_version="base", generate_fn=None,
                       progress=True, lora=None):
    """Knowledge text for every item (list by internal id, "" for padding), generated once and cached.

    llm/tokenizer: the model to generate with (e.g. the aligned LLM); None loads ``llm_path`` only when
        something is left to generate. A passed LLM must be the config's LLM plus the adapter named by
        ``adapter_version``: the cache key is computed from the config and that version.
    generate_fn: ``prompts -> texts`` (tests; custom backends); default batched greedy decoding.
    lora: the LoRA state of a passed peft LLM, so that ``llm_workers`` > 1 can rebuild it in each worker (a passed
        LLM without it generates in this process).
    """
    source_texts = item_source_texts(dataset, config)
    key, meta = knowledge_key(config["dataset"], source_texts, config, adapter_version)
    cache = KnowledgeCache(knowledge_cache_dir(config), key, meta)
    texts = cache.load_final()
    if texts is None:
        with build_lock(cache.final_path, f"generating the knowledge of '{config['dataset']}'"):
            texts = cache.load_final()  # a process that held the lock before us may have finished it
            if texts is None:
                return _generate_missing(cache, source_texts, config, llm, tokenizer, generate_fn, progress, lora)
    if len(texts) != len(source_texts):
        raise ValueError(f"Knowledge cache '{cache.final_path}' holds {len(texts)} items, expected "
                         f"{len(source_texts)}; delete it to regenerate.")
    logger.info(f"Knowledge texts of {len(texts) - 1} items (LLM adapter {adapter_version!r}) read from "
                f"{cache.final_path}")
    return texts


def _generate_missing(cache, source_texts, config, llm, tokenizer, generate_fn, progress, lora=None):
    """Generate what the resume file lacks, then write the final cache; the caller holds the build lock."""
    done = cache.load_partial()
    todo = [i for i in range(1, len(source_texts)) if i not in done]
    if todo:
        todo.sort(key=lambda i: len(source_texts[i]))  # similar lengths batch with less padding
        batch_size = int(seralm_get(config, "knowledge_batch_size"))
        batches = [todo[begin:begin + batch_size] for begin in range(0, len(todo), batch_size)]
        workers = worker_settings(config)
        logger.info(f"Generating knowledge for {len(todo)} items ({len(done)} cached) into {cache.partial_path}"
                    + (f" on {workers[0]} LLM workers" if workers[0] > 1 else ""))
        start = time.perf_counter()
        with tqdm(total=len(todo), desc="Knowledge generation", unit="item", disable=not progress) as bar:
            if workers[0] > 1 and generate_fn is None and (llm is None or lora is not None):
                _generate_on_workers(cache, batches, source_texts, config, lora, done, bar, workers)
            else:
                if generate_fn is None:
                    if llm is None or tokenizer is None:
                        llm, tokenizer = load_knowledge_llm(config)
                    generate_fn = _default_generate_fn(llm, tokenizer, config)
                for ids in batches:
                    texts = [source_texts[i] for i in ids]
                    prompts = knowledge_prompts(texts, tokenizer) if tokenizer is not None else texts
                    _store_batch(cache, done, ids, generate_fn(prompts))
                    bar.update(len(ids))
        elapsed = time.perf_counter() - start
        logger.info(f"Generated knowledge for {len(todo)} items in {elapsed:.1f} s "
                    f"({len(todo) / max(elapsed, 1e-9):.2f} items/s)")
    texts = [""] + [done[i] for i in range(1, len(source_texts))]
    cache.finalize(texts)
    return texts


def _store_batch(cache, done, ids, outputs):
    """Append one finished batch to the resume file (then it counts as done)."""
    outputs = [str(o).strip() for o in outputs]
    if len(outputs) != len(ids):
        raise RuntimeError(f"The generator returned {len(outputs)} texts for {len(ids)} prompts.")
    cache.append_batch(ids, outputs)
    kill_point("knowledge_batch")
    done.update(zip(ids, outputs))


def _generate_on_workers(cache, batches, source_texts, config, lora, done, bar, workers):
    """The same batches as one process, each generated by one of ``llm_workers`` Ray actors and stored as it
    arrives."""
    n, cpus, gpus, address = workers
    tasks = [(ids, [source_texts[i] for i in ids]) for ids in batches]
    with WorkerPool(KnowledgeWorker, (config, lora, cpus), n, cpus, gpus, address) as pool:
        pool.run(tasks, "generate", lambda task, outputs: _store_batch(cache, done, task[0], outputs),
                 progress=lambda task: bar.update(len(task[0])))


class KnowledgeWorker:
    """A Ray actor generating knowledge with its own copy of the config's LLM (plus a LoRA state, if given)."""

    def __init__(self, config, lora, num_cpus):
        set_worker_threads(num_cpus)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray shows a worker only the GPUs it was given
        if lora is None:
            llm, tokenizer = load_knowledge_llm(config, device=device)
        else:
            llm, tokenizer = build_lora_llm(config, device=device)
            load_lora_state(llm, lora)
        llm.eval()
        self.tokenizer = tokenizer
        self.generate_fn = _default_generate_fn(llm, tokenizer, config)

    def generate(self, ids, texts):
        return self.generate_fn(knowledge_prompts(texts, self.tokenizer))


# ----------------------------------------------------------------------------------------- encoding
def vectors_path(texts, config):
    """``vectors-<key>.safetensors``: the key digests the texts, the encoder (files, dtype), the encoding
    settings and the package version."""
    key = _digest({"texts": _digest(list(texts), 32), **encoder_identity(config), "encoder_dtype": compute_dtype(config),
                   "max_length": int(seralm_get(config, "knowledge_encoder_max_length")), "normalize": True,
                   "package_version": package_version()})
    return os.path.join(knowledge_cache_dir(config), f"vectors-{key}.safetensors")


def encode_texts(model, tokenizer, texts, max_length, progress=False):
    """Sentence vectors [len(texts), d_text] (float32, CPU) of knowledge texts as the models read them: mean
    pooling, L2-normalised, cut to ``max_length`` tokens; an empty text is a zero vector ("no knowledge")."""
    texts = list(texts)
    vectors = torch.zeros(len(texts), model.config.hidden_size)
    rows = [i for i, text in enumerate(texts) if text.strip()]
    if rows:
        vectors[rows] = encode.mean_pool_encode(model, tokenizer, [texts[i] for i in rows], normalize=True,
                                                progress=progress, max_length=max_length).float().cpu()
    return vectors


def encode_knowledge(texts, config, encoder=None, progress=True):
    """Sentence vectors [len(texts), d_text] (float32) for knowledge texts by item id; row 0 (padding) and
    empty texts are 0.

    Cached on disk by the texts' digest + encoder identity (safetensors, atomic write).
    encoder: optional (model, tokenizer); None loads ``encoder_path`` (bundled MiniLM) only on a cache miss.
    """
    texts = list(texts)
    path = vectors_path(texts, config)
    vectors = _load_vectors(path, len(texts))
    if vectors is None:
        with build_lock(path, "encoding knowledge vectors"):
            vectors = _load_vectors(path, len(texts))  # a process that held the lock before us may have written it
            if vectors is None:
                logger.info(f"Encoding the knowledge of {len(texts) - 1} items into {path}")
                return _encode_and_save(texts, config, encoder, path, progress)
    logger.info(f"Knowledge vectors of {len(texts) - 1} items read from {path}")
    return vectors


def _load_vectors(path, n_rows):
    """The cached matrix at ``path`` if it exists and has ``n_rows`` rows, else None."""
    if not os.path.isfile(path):
        return None
    try:
        vectors = load_file(path)["vectors"]
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise CorruptFileError(f"Knowledge vectors cache '{path}' cannot be read ({str(err).splitlines()[0]}); "
                               "delete it to re-encode.") from None
    if vectors.size(0) == n_rows:
        return vectors
    logger.warning(f"Ignoring {path}: it holds {vectors.size(0)} rows, expected {n_rows}.")
    return None


def _encode_and_save(texts, config, encoder, path, progress):
    # The padding item (row 0) and items whose knowledge came out empty get a zero vector.
    texts = [""] + list(texts[1:])
    max_length = int(seralm_get(config, "knowledge_encoder_max_length"))
    workers = worker_settings(config)
    if workers[0] > 1 and encoder is None:
        vectors = _encode_on_workers(texts, config, max_length, workers, progress)
    else:
        if encoder is None:
            device = config["device"] if "device" in config else None
            encoder = loader.load_text_encoder(seralm_get(config, "encoder_path"), device=device)
        model, tokenizer = encoder
        vectors = encode_texts(model, tokenizer, texts, max_length, progress=progress)
    vectors = vectors.contiguous()
    _atomic_write(path, lambda tmp: save_file({"vectors": vectors}, tmp))
    return vectors


ENCODE_SHARD = 512  # items per encoding task of a worker


def _encode_on_workers(texts, config, max_length, workers, progress):
    """``encode_texts`` of consecutive shards of the items, one shard at a time per worker."""
    n, cpus, gpus, address = workers
    parts = {}
    tasks = [(start, texts[start:start + ENCODE_SHARD], max_length) for start in range(0, len(texts), ENCODE_SHARD)]
    with tqdm(total=len(texts), desc="Knowledge encoding", unit="item", disable=not progress) as bar, \
            WorkerPool(EncoderWorker, (config, cpus), n, cpus, gpus, address) as pool:
        pool.run(tasks, "encode", lambda task, vectors: parts.__setitem__(task[0], vectors),
                 progress=lambda task: bar.update(len(task[1])))
    return torch.cat([parts[start] for start in sorted(parts)])


class EncoderWorker:
    """A Ray actor encoding knowledge texts with its own copy of the config's text encoder."""

    def __init__(self, config, num_cpus):
        set_worker_threads(num_cpus)
        self.model, self.tokenizer = loader.load_text_encoder(seralm_get(config, "encoder_path"),
                                                              device="cuda" if torch.cuda.is_available() else "cpu")

    def encode(self, start, texts, max_length):
        return encode_texts(self.model, self.tokenizer, texts, max_length)


def grounding_prefixes(dataset, config):
    """What ``knowledge_grounding`` puts before each item's knowledge text before encoding, by item id: the item's
    own text (``joint``), or None (``none``, the paper: the knowledge alone)."""
    mode = seralm_get(config, "knowledge_grounding")
    if mode not in GROUNDINGS:
        raise ValueError(f"knowledge_grounding={mode!r} is not supported; expected one of {GROUNDINGS}.")
    return item_source_texts(dataset, config) if mode == "joint" else None


def ground(prefixes, items, texts):
    """``texts`` of ``items`` as the encoder reads them: "<item text>. <knowledge>" with grounding prefixes, the texts
    themselves without (prefixes None)."""
    if prefixes is None:
        return list(texts)
    return [f"{prefixes[i]}. {t}" if t.strip() else prefixes[i] for i, t in zip(items, texts)]


def knowledge_texts(dataset, config, adapter_version="base"):
    """Texts whose vectors feed the model, by item id: LLM knowledge (grounded in the item's own text with
    ``knowledge_grounding: joint``), or the items' own text (``knowledge_source: item_text``, a cheap baseline that
    needs no LLM)."""
    source = seralm_get(config, "knowledge_source")
    if source not in KNOWLEDGE_SOURCES:
        raise ValueError(f"knowledge_source={source!r} is not supported; expected one of {KNOWLEDGE_SOURCES}.")
    if source == "item_text":
        return item_source_texts(dataset, config)
    return grounded_texts(dataset, config, generate_knowledge(dataset, config, adapter_version=adapter_version))


def grounded_texts(dataset, config, texts):
    """Generated knowledge (list by item id, "" for padding) as the encoder reads it (see ``ground``)."""
    prefixes = grounding_prefixes(dataset, config)
    if prefixes is None:
        return list(texts)
    return [""] + ground(prefixes, range(1, len(texts)), texts[1:])


def knowledge_matrix(dataset, config, adapter_version="base"):
    """[n_items, d_text] knowledge vectors for ``dataset``: generate (or load) then encode (or load)."""
    return encode_knowledge(knowledge_texts(dataset, config, adapter_version), config)
