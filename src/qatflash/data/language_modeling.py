"""The LightningDataModule for causal language modelling: packed training blocks, scored evaluation windows.

Each split's rows are tokenized and concatenated into one token stream. Training cuts its stream
into blocks of `data.max_length` tokens (the remainder dropped), so sequence length is a sweep
axis and no batch holds padding. Validation and test streams are scored whole: a boundary token
(the tokenizer's BOS, else EOS) is put in front and windows of `data.eval_length` tokens cover the
stream so that every token is predicted exactly once, from the tokens before it in its window.
The scored tokens are therefore the same whatever the training or evaluation length, and the
count of them is recorded with every perplexity.

Every map step carries an explicit fingerprint (the raw data's, the vocabulary's and the lengths),
so the cached result is found again by every later run and sweep point that shares them.
"""

from __future__ import annotations

import hashlib
from functools import partial

from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader, RandomSampler

from qatflash.config import DataConfig
from qatflash.data.corpus import load_corpus, unigram_word_perplexity, words
from qatflash.data.datamodule import EpochSeededSampler, TokenizedData, TokenizerFactory
from qatflash.errors import ConfigError

# Labels the loss skips: context positions and the padding of a split's last window.
IGNORE = -100
# Part of the cache fingerprint: bump when a map step's output changes.
_FORMAT = "lm/1"


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256("-".join(map(str, (*parts, _FORMAT))).encode()).hexdigest()[:32]


def packed_blocks(ids: list[int], length: int) -> list[list[int]]:
    """`ids` cut into consecutive blocks of `length` tokens; the incomplete last block is dropped."""
    return [ids[start : start + length] for start in range(0, len(ids) - length + 1, length)]


def scoring_windows(
    ids: list[int], boundary: int, length: int, stride: int | None, pad: int
) -> dict[str, list[list[int]]]:
    """Windows over `[boundary] + ids` that score each of `ids` exactly once.

    A window's labels are its inputs with the positions it does not score set to IGNORE (the model
    shifts them: label i is predicted from inputs up to i - 1). Without `stride` consecutive windows
    share one token, the last of one being the first (context) of the next; with it each window
    starts `stride` tokens after the previous one and scores only the tokens no earlier window did.
    The last window is padded to `length` (pad inputs, IGNORE labels), which no scored position
    attends to under causal attention, so batches need no attention mask.
    """
    stream = [boundary, *ids]
    step = stride or length - 1
    inputs, labels = [], []
    begin, scored_until = 0, 0  # every position <= scored_until is scored (0: the boundary, never)
    while scored_until < len(ids):
        end = min(begin + length, len(stream))
        window = stream[begin:end]
        first = scored_until + 1 - begin  # the first position of this window not scored yet
        padding = length - len(window)
        inputs.append(window + [pad] * padding)
        labels.append([IGNORE] * first + window[first:] + [IGNORE] * padding)
        scored_until = end - 1
        begin += step
    return {"input_ids": inputs, "labels": labels}


class LanguageModelingData(TokenizedData):
    def __init__(self, cfg: DataConfig, tokenizer_factory: TokenizerFactory, seed: int = 0) -> None:
        super().__init__(cfg, tokenizer_factory, seed)
        # Set by setup(): the test split's word and scored-token counts, and the unigram baseline.
        self.test_words = 0
        self.test_tokens = 0
        self.unigram_word_ppl = float("nan")

    @property
    def eval_length(self) -> int:
        return self.cfg.eval_length or self.cfg.max_length

    @property
    def train_size(self) -> int:
        """Training blocks: counted from the tokenized text, so this tokenizes (once)."""
        self.setup()
        assert self.splits is not None
        return len(self.splits["train"])

    @property
    def pads_batches(self) -> bool:
        """Batches carry no attention mask: blocks are full and a window's padding is never attended."""
        return False

    def setup(self, stage: str | None = None) -> None:
        """Load, train or load the tokenizer, tokenize, pack and window; Lightning calls it per stage."""
        if self.splits is not None:
            return
        raw = load_corpus(self.cfg)
        self.tokenizer = self._tokenizer_factory(raw["train"]["text"])
        vocabulary = self.vocabulary_digest()
        tokens = DatasetDict({split: self._tokenize(ds, vocabulary) for split, ds in raw.items()})
        train = self._grouped(tokens["train"], "pack", partial(_pack, length=self.cfg.max_length))
        if len(train) == 0:
            held = sum(len(ids) for ids in tokens["train"]["input_ids"])
            raise ConfigError(
                f"data.max_length={self.cfg.max_length}: the training split holds {held} tokens, fewer "
                "than one training block; use a smaller data.max_length or more training text"
            )
        if self.cfg.train_subset is not None and self.cfg.train_subset < len(train):
            train = train.shuffle(seed=self.seed).select(range(self.cfg.train_subset))
        windows = partial(
            _windows,
            boundary=self._boundary,
            length=self.eval_length,
            stride=self.cfg.eval_stride,
            pad=self.tokenizer.pad_token_id,
        )
        evaluated = {
            split: self._grouped(tokens[split], "windows", windows) for split in ("validation", "test")
        }
        self.splits = DatasetDict({"train": train, **evaluated}).with_format("torch")
        test_words = words(raw["test"]["text"])
        self.test_words = len(test_words)
        self.test_tokens = sum(len(ids) for ids in tokens["test"]["input_ids"])
        self.unigram_word_ppl = unigram_word_perplexity(words(raw["train"]["text"]), test_words)

    @property
    def _boundary(self) -> int:
        tokenizer = self.tokenizer
        boundary = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        assert boundary is not None, "causal_lm tokenizers have an EOS token (the task sets one)"
        return boundary

    def _tokenize(self, ds: Dataset, vocabulary: str) -> Dataset:
        """Token ids per row: a row ending in a line break is a line of running text (a .txt file,
        WikiText's rows) and is tokenized as it is; any other row is a document, closed by EOS."""
        tokenizer = self.tokenizer
        eos = [tokenizer.eos_token_id]

        def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            return {
                "input_ids": [
                    ids if text.endswith("\n") else ids + eos
                    for text, ids in zip(batch["text"], encoded, strict=True)
                ]
            }

        return ds.map(
            tokenize,
            batched=True,
            remove_columns=["text"],
            new_fingerprint=_fingerprint(ds._fingerprint, vocabulary),
            desc="tokenize",
        )

    def _grouped(self, ds: Dataset, name: str, group: partial) -> Dataset:
        """`group` over the split's whole token stream (one batch: the stream must not be cut)."""
        return ds.map(
            group,
            batched=True,
            batch_size=None,
            remove_columns=ds.column_names,
            new_fingerprint=_fingerprint(ds._fingerprint, name, sorted(group.keywords.items())),
            desc=name,
        )

    def _loader(self, split: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        assert self.splits is not None, "call setup() first"
        sampler = (
            EpochSeededSampler(partial(RandomSampler, self.splits[split]), self.seed) if shuffle else None
        )
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.cfg.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.cfg.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.cfg.eval_batch_size)


def _stream(batch: dict[str, list[list[int]]]) -> list[int]:
    return [token for ids in batch["input_ids"] for token in ids]


def _pack(batch: dict[str, list[list[int]]], length: int) -> dict[str, list[list[int]]]:
    blocks = packed_blocks(_stream(batch), length)
    return {"input_ids": blocks, "labels": blocks}


def _windows(
    batch: dict[str, list[list[int]]], boundary: int, length: int, stride: int | None, pad: int
) -> dict[str, list[list[int]]]:
    return scoring_windows(_stream(batch), boundary, length, stride, pad)
