"""Data: the synthetic task, real SST-2 files, generic local folders, padding and tokenization caching."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
from conftest import SST2

from qatflash.config import SyntheticConfig, to_config
from qatflash.data import TextClassificationData
from qatflash.data.synthetic import synthetic_splits
from qatflash.errors import ConfigError
from qatflash.models import load_tokenizer


def _datamodule(make_cfg, *overrides: str) -> TextClassificationData:
    config = to_config(make_cfg(*overrides))
    dm = TextClassificationData(config.data, partial(load_tokenizer, config.model), config.seed)
    dm.setup()
    return dm


def _evidence(text: str) -> tuple[int, int]:
    words = text.split()
    return sum(w.startswith("good") for w in words), sum(w.startswith("bad") for w in words)


def test_synthetic_is_seeded_and_labelled_by_the_majority() -> None:
    cfg = SyntheticConfig(num_train=200, num_validation=10, num_test=10)
    first, again, other = synthetic_splits(cfg, 0), synthetic_splits(cfg, 0), synthetic_splits(cfg, 1)
    assert first["train"]["text"] == again["train"]["text"]
    assert first["train"]["text"] != other["train"]["text"]
    for text, label in zip(first["train"]["text"], first["train"]["label"], strict=True):
        good, bad = _evidence(text)
        assert good + bad == cfg.evidence
        assert label == int(good > bad)


def test_synthetic_truncation_hides_evidence() -> None:
    """The evidence is spread along the sentence: a prefix decides the label far less often."""
    cfg = SyntheticConfig(num_train=2000, num_validation=10, num_test=10)
    train = synthetic_splits(cfg, 0)["train"]
    decided_by_prefix = 0
    for text, label in zip(train["text"], train["label"], strict=True):
        good, bad = _evidence(" ".join(text.split()[: cfg.words // 4]))
        remaining = cfg.evidence - good - bad
        # The prefix alone fixes the label only if the rest cannot overturn it.
        decided_by_prefix += abs(good - bad) > remaining and label == int(good > bad)
    assert decided_by_prefix / len(train) < 0.2


@pytest.mark.needs("sst2")
def test_sst2_local_files_load_and_tokenize(make_cfg) -> None:
    dm = _datamodule(make_cfg, "data=sst2", f"data.path={SST2}", "model.arch.vocab_size=4000")
    assert {s: len(dm.splits[s]) for s in dm.splits} == {"train": 60614, "validation": 6735, "test": 872}
    assert dm.num_labels == 2
    row = dm.splits["test"][0]
    assert {"input_ids", "attention_mask", "labels"} <= set(row)
    assert (
        row["input_ids"][0] == dm.tokenizer.cls_token_id and row["input_ids"][-1] == dm.tokenizer.sep_token_id
    )
    assert dm.tokenizer.unk_token_id not in row["input_ids"]


@pytest.mark.needs("sst2")
@pytest.mark.needs("models")
def test_sst2_with_the_pretrained_minilm_tokenizer(make_cfg) -> None:
    dm = _datamodule(make_cfg, "model=minilm", "data=sst2", f"data.path={SST2}", "data.train_subset=500")
    assert len(dm.splits["train"]) == 500 and len(dm.splits["test"]) == 872
    assert dm.tokenizer.vocab_size == 30522


def test_tokenization_is_cached_across_runs(make_cfg, tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        rows = [{"text": f"sample {i} of {split}", "label": i % 2} for i in range(40)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    overrides = ("data=local", f"data.path={folder}", f"data.cache_dir={tmp_path / 'cache'}")
    first = _datamodule(make_cfg, *overrides).splits["train"]
    (cached,) = {Path(f["filename"]) for f in first.cache_files if "cache-" in f["filename"]}
    written = cached.stat().st_mtime_ns
    second = _datamodule(make_cfg, *overrides).splits["train"]
    assert first.cache_files == second.cache_files
    assert cached.stat().st_mtime_ns == written  # read back, not tokenized and written again
    # Another length, or another vocabulary (fewer words learnt), is another tokenization.
    for other in ("data.max_length=8", "model.arch.vocab_size=40"):
        assert _datamodule(make_cfg, *overrides, other).splits["train"].cache_files != first.cache_files, (
            other
        )


def test_string_labels_headerless_files_and_inferred_num_labels(make_cfg, tmp_path: Path) -> None:
    for split in ("train", "validation", "test"):
        rows = [f"{label}\tsome words {i}" for i, label in enumerate(["neg", "pos", "neutral"] * 5)]
        (tmp_path / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    dm = _datamodule(
        make_cfg,
        "data=local",
        f"data.path={tmp_path}",
        "data.header=false",
        "data.column_names=[label,text]",
    )
    assert dm.label_names == ["neg", "neutral", "pos"]
    assert dm.splits["train"]["labels"][:3] == [0, 2, 1]


def _write_csv(folder: Path, header: str = "text,label", rows: str = "a,0\nb,1\n") -> None:
    for split in ("train", "validation", "test"):
        (folder / f"{split}.csv").write_text(f"{header}\n{rows}")


@pytest.mark.parametrize(
    ("setup", "overrides", "message"),
    [
        (lambda d: None, [], "has no 'train' file"),
        (
            lambda d: _write_csv(d, header="review,label"),
            [],
            "data.text_column=text is not a column of the train split",
        ),
        (lambda d: _write_csv(d), ["data.num_labels=3"], "data.num_labels=3 does not match the 2 labels"),
        (lambda d: _write_csv(d, rows="a,-1\nb,1\n"), [], "integer labels must be >= 0"),
        (lambda d: (_write_csv(d), (d / "test.csv").unlink()), [], "has no 'test' file"),
    ],
)
def test_bad_data_folders_are_refused(
    make_cfg, tmp_path: Path, setup, overrides: list[str], message: str
) -> None:
    setup(tmp_path)
    with pytest.raises(ConfigError, match=message):
        _datamodule(make_cfg, "data=local", f"data.path={tmp_path}", *overrides)


def test_missing_folder_is_refused(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a folder"):
        _datamodule(make_cfg, "data=local", f"data.path={tmp_path / 'nope'}")


def test_training_pads_to_the_batch_and_evaluation_can_pad_to_max_length(make_cfg) -> None:
    overrides = (
        "data.synthetic.num_train=64",
        "data.synthetic.words=20",
        "data.max_length=48",
        "data.batch_size=8",
    )
    dm = _datamodule(make_cfg, *overrides)
    batch = next(iter(dm.train_dataloader()))
    longest = int(batch["attention_mask"].sum(dim=1).max())
    assert batch["input_ids"].shape[1] == longest < 48
    assert dm.pads_batches
    fixed = _datamodule(make_cfg, *overrides, "data.eval_padding=max_length")
    assert next(iter(fixed.test_dataloader()))["input_ids"].shape[1] == 48


def test_one_length_inputs_carry_no_padding(make_cfg) -> None:
    dm = _datamodule(make_cfg, "data.synthetic.num_train=64", "data.max_length=24")
    assert dm.sequence_lengths == [24] and not dm.pads_batches
