"""Raw splits from a local folder, the hub or the synthetic task, normalised to `text` + integer `label`.

Everything loads through HF `datasets`, so parsed files are cached as Arrow and reused by every run
and sweep point that reads the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import ClassLabel, DatasetDict, load_dataset

from qatflash.config import SPLITS, DataConfig
from qatflash.data.synthetic import synthetic_splits
from qatflash.errors import ConfigError

# The file names (stems) each split is found under in a folder: its own, then the names corpora use.
SPLIT_FILE_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
# File suffix -> (datasets builder, extra builder arguments).
_FORMATS = {
    ".tsv": ("csv", {"sep": "\t", "quoting": 3}),
    ".csv": ("csv", {}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


def hub_splits(cfg: DataConfig) -> DatasetDict:
    """The splits of `data.hub_id` (network, or the HF cache) named by `data.hub_splits`."""
    return DatasetDict(
        {
            split: load_dataset(cfg.hub_id, cfg.hub_name, split=spec, cache_dir=cfg.cache_dir)
            for split, spec in cfg.hub_splits.items()
        }
    )


def load_splits(cfg: DataConfig, seed: int) -> DatasetDict:
    """train/validation/test with columns `text` (str) and `label` (ClassLabel, ids from 0)."""
    if cfg.path is not None:
        raw = _local_splits(cfg)
    elif cfg.hub_id is not None:
        raw = hub_splits(cfg)
    else:
        assert cfg.synthetic is not None
        return _as_classlabel(synthetic_splits(cfg.synthetic, seed), cfg)
    return _as_classlabel(_select_columns(raw, cfg), cfg)


def _local_splits(cfg: DataConfig) -> DatasetDict:
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"data.path={cfg.path} is not a folder; give a folder holding train/validation/test files"
        )
    return load_files(cfg, split_files(cfg, folder, SPLITS, _FORMATS), _FORMATS)


def split_files(
    cfg: DataConfig, folder: Path, splits: tuple[str, ...], formats: dict[str, Any]
) -> dict[str, str]:
    """The file of each split in `folder`: the one `data.files` names, else the one named after the
    split (SPLIT_FILE_NAMES: valid.txt, val.txt or dev.txt hold validation too), refused if several are."""
    files = {}
    for split in splits:
        if cfg.files.get(split):
            found = [folder / cfg.files[split]]
            if not found[0].is_file():
                raise ConfigError(f"data.files.{split}={cfg.files[split]} is not a file in {folder}")
        else:
            names = SPLIT_FILE_NAMES[split]
            found = sorted(p for p in folder.iterdir() if p.stem in names and p.suffix in formats)
            expected = "|".join(names) + "{" + ",".join(formats) + "}"
            if not found:
                raise ConfigError(
                    f"data.path={cfg.path} has no '{split}' file; expected {expected}, "
                    f"or name it: data.files.{split}=<file>"
                )
            if len(found) > 1:
                raise ConfigError(
                    f"data.path={cfg.path} has several '{split}' files {[p.name for p in found]}; "
                    f"choose one: data.files.{split}=<file>"
                )
        if found[0].stat().st_size == 0:
            raise ConfigError(f"data.path={cfg.path}: {found[0].name} is empty")
        files[split] = str(found[0])
    return files


def load_files(cfg: DataConfig, files: dict[str, str], formats: dict[str, Any]) -> DatasetDict:
    """The splits' files parsed by HF datasets (cached as Arrow); one format for all of them."""
    suffixes = {Path(f).suffix for f in files.values()}
    if len(suffixes) != 1:
        raise ConfigError(f"data.path={cfg.path} mixes file formats {sorted(suffixes)}; use one format")
    suffix = suffixes.pop()
    if suffix not in formats:
        raise ConfigError(f"data.path={cfg.path}: {suffix} files are not read; use one of {list(formats)}")
    builder, kwargs = formats[suffix]
    if builder == "csv" and not cfg.header:
        kwargs = {**kwargs, "header": None, "names": list(cfg.column_names or [])}
    try:
        return load_dataset(builder, data_files=files, cache_dir=cfg.cache_dir, **kwargs)
    except ValueError as error:  # e.g. a header-only file: datasets finds no rows for a split
        raise ConfigError(
            f"data.path={cfg.path}: its {builder} files could not be read ({str(error).splitlines()[0]}); "
            f"each of {'/'.join(files)} needs at least one row"
        ) from None


def _select_columns(raw: DatasetDict, cfg: DataConfig) -> DatasetDict:
    for split, ds in raw.items():
        for role, column in (("text", cfg.text_column), ("label", cfg.label_column)):
            if column not in ds.column_names:
                raise ConfigError(
                    f"data.{role}_column={column} is not a column of the {split} split; "
                    f"its columns are {ds.column_names}"
                )
    raw = raw.select_columns([cfg.text_column, cfg.label_column])
    renames = {
        old: new for old, new in ((cfg.text_column, "text"), (cfg.label_column, "label")) if old != new
    }
    return raw.rename_columns(renames) if renames else raw


def _as_classlabel(raw: DatasetDict, cfg: DataConfig) -> DatasetDict:
    """Map labels to ids 0..n-1 with one mapping for all splits, checked against data.num_labels."""
    feature = raw["train"].features["label"]
    if isinstance(feature, ClassLabel):
        names = feature.names
    else:
        values = sorted({v for split in raw.values() for v in split.unique("label")}, key=str)
        if all(isinstance(v, int) for v in values):
            if min(values) < 0:
                raise ConfigError(
                    f"data.label_column={cfg.label_column} holds {min(values)}; integer labels must be >= 0 "
                    "(unlabelled splits such as the hub's GLUE test cannot be used)"
                )
            names = [str(i) for i in range(max(values) + 1)]
        else:
            names = [str(v) for v in values]
        raw = raw.cast_column("label", ClassLabel(names=names)) if values else raw
    if cfg.num_labels is not None and cfg.num_labels != len(names):
        raise ConfigError(
            f"data.num_labels={cfg.num_labels} does not match the {len(names)} labels in the data {names[:10]}"
        )
    return raw
