"""Inputs users type for their own text, through the command line: split files named as corpora
name them, `data.files` set on the command line, and a training split too short to train on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import LM_FAST, TINY_DECODER

from qatflash.config import DataConfig
from qatflash.data.sources import split_files
from qatflash.errors import ConfigError
from qatflash.results import read_results

LM_JOB = [*LM_FAST, "model=llama_tiny", *TINY_DECODER, "benchmark=none", "logger=none"]


@pytest.mark.parametrize("name", ["validation", "valid", "val", "dev"])
def test_the_validation_file_is_found_under_the_names_corpora_use(tmp_path: Path, name: str) -> None:
    for stem in ("train", name, "test"):
        (tmp_path / f"{stem}.txt").write_text("a line\n")
    found = split_files(
        DataConfig(path=str(tmp_path)), tmp_path, ("train", "validation", "test"), {".txt": None}
    )
    assert found["validation"] == str(tmp_path / f"{name}.txt")


def test_two_candidate_validation_files_are_refused_naming_both(tmp_path: Path) -> None:
    for stem in ("valid", "dev"):
        (tmp_path / f"{stem}.txt").write_text("a line\n")
    with pytest.raises(
        ConfigError, match=r"several 'validation' files \['dev.txt', 'valid.txt'\]; choose one"
    ):
        split_files(DataConfig(path=str(tmp_path)), tmp_path, ("validation",), {".txt": None})


def test_data_files_from_the_command_line_name_the_splits(
    run_app, text_corpus: Path, hf_cache: Path, tmp_path: Path
) -> None:
    """Train and test under names of the user's choosing, given on the command line; validation
    found as valid.txt."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    shutil.copy(text_corpus / "train.txt", folder / "training.txt")
    shutil.copy(text_corpus / "validation.txt", folder / "valid.txt")
    test_lines = (text_corpus / "test.txt").read_text().splitlines(keepends=True)[:100]
    (folder / "eval.txt").write_text("".join(test_lines))
    code, stderr = run_app(
        *LM_JOB,
        f"data.path={folder}",
        "data.files={train: training.txt, test: eval.txt}",
        f"data.cache_dir={hf_cache}",
        "trainer.max_steps=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert code == 0, stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "ok"
    # the test split scored is eval.txt: its 100 sentences of 7 words
    assert results["metrics"]["test/words"] == 100 * 7


@pytest.mark.parametrize("recipe", ["fp32", "ptq_dynamic", "qat_x86", "wo_packed_int8"])
def test_a_training_split_shorter_than_one_block_is_refused_in_one_line(
    run_app, text_corpus: Path, hf_cache: Path, tmp_path: Path, recipe: str
) -> None:
    folder = tmp_path / "corpus"
    shutil.copytree(text_corpus, folder)
    (folder / "train.txt").write_text("the cat sees a dog .\n")
    code, stderr = run_app(
        *LM_JOB,
        f"data.path={folder}",
        f"data.cache_dir={hf_cache}",
        f"quant={recipe}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert code == 2
    (line,) = [line for line in stderr.splitlines() if line.startswith("qatflash: error:")]
    assert "Traceback" not in stderr
    tokens = int(line.split("holds ")[1].split(" tokens")[0])
    assert 0 < tokens < 32
    assert line.startswith("qatflash: error: data.max_length=32: the training split holds")
    assert "fewer than one training block" in line
    recorded = read_results(tmp_path / "run")
    assert recorded is None or recorded["status"] != "ok"
