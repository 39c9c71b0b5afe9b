"""Causal language modelling: packing, scoring windows and caching; perplexity against a hand count;
every recipe on both decoder families, saved and reloaded; the hub path from a folder; refusals."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LM_FAST, TINY_DECODER, LearnedDecoder, recipe_case
from transformers import AutoConfig

from qatflash.config import DataConfig, to_config
from qatflash.data.corpus import unigram_word_perplexity, words
from qatflash.data.language_modeling import IGNORE, packed_blocks, scoring_windows
from qatflash.errors import ConfigError
from qatflash.job import JobContext
from qatflash.models import build_model_from_config, train_bpe
from qatflash.pipeline import preflight, run
from qatflash.quant import make_recipe
from qatflash.results import MODEL_CONFIG_FILE
from qatflash.tasks.causal_lm import CausalLMTask

CHOICES = {"task": "causal_lm", "model": "llama_tiny", "data": "text"}


def _cfg(make_cfg, corpus: Path, *overrides: str):
    return to_config(
        make_cfg(
            *LM_FAST, "model=llama_tiny", *TINY_DECODER, f"data.path={corpus}", "logger=none", *overrides
        )
    )


def _scored(windows: dict[str, list[list[int]]]) -> list[int]:
    return [label for row in windows["labels"] for label in row if label != IGNORE]


@pytest.mark.parametrize(
    ("length", "stride"), [(8, None), (16, None), (98, None), (300, None), (16, 4), (16, 15)]
)
def test_scoring_windows_predict_every_token_once_from_the_tokens_before_it(length, stride) -> None:
    ids = list(range(10, 107))
    windows = scoring_windows(ids, boundary=1, length=length, stride=stride, pad=0)
    assert _scored(windows) == ids
    for inputs, labels in zip(windows["input_ids"], windows["labels"], strict=True):
        assert len(inputs) == len(labels) == length
        scored = [i for i, label in enumerate(labels) if label != IGNORE]
        assert scored[0] >= 1 and all(inputs[i] == labels[i] for i in scored)
    if stride is not None:  # every window after the first scores `stride` new tokens behind its context
        assert {len([x for x in row if x != IGNORE]) for row in windows["labels"][1:-1]} == {stride}


def test_packed_blocks_are_consecutive_and_drop_the_remainder() -> None:
    assert packed_blocks(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def _windows_by_hand(ids: list[int], boundary: int, length: int, pad: int) -> list[list[int]]:
    """Windows of `length` over `[boundary] + ids`, one starting every `length - 1` tokens (each
    scores `length - 1` new ones), the last padded: the default stride, whatever the training length."""
    stream = [boundary, *ids]
    return [
        (stream[start : start + length] + [pad] * length)[:length] for start in range(0, len(ids), length - 1)
    ]


def test_evaluation_scores_the_same_tokens_whatever_the_lengths(make_cfg, text_corpus: Path) -> None:
    """Scored tokens alone would not tell 26 windows of 64 from 104 that overlap by 49: the windows
    are compared too, input for input, so that the training length cannot change the evaluation."""
    scored, shapes = [], []
    for length, eval_length in ((16, None), (48, None), (16, 64)):
        cfg = _cfg(
            make_cfg, text_corpus, f"data.max_length={length}", f"data.eval_length={eval_length or 'null'}"
        )
        data = CausalLMTask(cfg).data_module()
        data.setup()
        test = data.splits["test"][:]
        labels = test["labels"].flatten()
        scored.append(labels[labels != IGNORE].tolist())
        shapes.append(
            (tuple(data.splits["train"][:]["input_ids"].shape[1:]), tuple(test["input_ids"].shape[1:]))
        )
        assert len(scored[-1]) == data.test_tokens
        windows, tokenizer = test["input_ids"].tolist(), data.tokenizer
        window = eval_length or length
        assert len(windows) == math.ceil(data.test_tokens / (window - 1))
        assert windows == _windows_by_hand(scored[-1], tokenizer.bos_token_id, window, tokenizer.pad_token_id)
    assert scored[0] == scored[1] == scored[2]
    assert shapes == [((16,), (16,)), ((48,), (48,)), ((16,), (64,))]


def test_tokenized_and_packed_splits_are_cached(make_cfg, text_corpus: Path) -> None:
    cfg = _cfg(make_cfg, text_corpus, "data.max_length=24")
    first = CausalLMTask(cfg).data_module()
    first.setup()
    files = {split: ds.cache_files[0]["filename"] for split, ds in first.splits.items()}
    written = {split: Path(f).stat().st_mtime_ns for split, f in files.items()}
    again = CausalLMTask(cfg).data_module()
    again.setup()
    assert {split: ds.cache_files[0]["filename"] for split, ds in again.splits.items()} == files
    assert {split: Path(f).stat().st_mtime_ns for split, f in files.items()} == written


@pytest.mark.e2e
def test_trained_bpe_is_the_same_in_another_process(text_corpus: Path) -> None:
    """tokenizers' trainer must not break ties by hash order: another process (another hash seed)
    must learn the same vocabulary, or runs and dataset caches would disagree."""
    script = (
        "import hashlib; from qatflash.models import train_bpe; "
        f"t = train_bpe(open({str(text_corpus / 'train.txt')!r}).readlines(), 300); "
        "print(hashlib.sha256(t.backend_tokenizer.to_str().encode()).hexdigest())"
    )
    other = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "7"},
    )
    here = train_bpe((text_corpus / "train.txt").read_text().splitlines(keepends=True), 300)
    assert other.stdout.strip() == hashlib.sha256(here.backend_tokenizer.to_str().encode()).hexdigest()


def test_unigram_baseline_by_hand() -> None:
    train, test = words(["a a b\n"]), words(["a c\n"])
    # counts a=2, b=1: N=3, V=2+1; p(a) = 3/6, p(c) = 1/6 (unseen): perplexity sqrt(12).
    assert unigram_word_perplexity(train, test) == pytest.approx(math.sqrt(12))


def test_the_unigram_baseline_is_counted_on_the_training_split(make_cfg, tmp_path: Path) -> None:
    """The baseline a data module records is the training words' unigram model scored on the test
    words (the hand count above), not the test words' own model, which knows every test word."""
    for split, text in (("train", "a a b\n"), ("validation", "a b\n"), ("test", "a c\n")):
        (tmp_path / f"{split}.txt").write_text(text)
    # blocks of 2 tokens: the 4-token training split must hold one
    data = CausalLMTask(_cfg(make_cfg, tmp_path, "data.max_length=2")).data_module()
    data.setup()
    # Counted on the test split instead: a=1, c=1, N=2, V=3, p = 2/5 each, perplexity 2.5.
    assert data.test_words == 2 and data.unigram_word_ppl == pytest.approx(math.sqrt(12))


def test_perplexity_is_the_token_summed_nll_over_the_whole_split(make_cfg, text_corpus: Path) -> None:
    """Against a hand count from log-softmax: a mean of per-batch perplexities, a dropped window or a
    token scored twice would each move it. Windows of 24 tokens and batches of 5 leave a short last
    batch and a padded last window."""
    import lightning as L

    cfg = _cfg(make_cfg, text_corpus, "data.max_length=24", "data.eval_batch_size=5")
    task = CausalLMTask(cfg)
    data = task.data_module()
    data.setup()
    torch.manual_seed(0)
    model = build_model_from_config(task.model_config(data), cfg.attention, task.auto_model).eval()
    module = task.lightning_module(model, data)
    (tested,) = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(
        module, datamodule=data, verbose=False
    )
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in data.splits["test"]:
            log_probs = model(input_ids=row["input_ids"][None]).logits[0].double().log_softmax(-1)
            for i, label in enumerate(row["labels"].tolist()):
                if label != IGNORE:
                    nll -= float(log_probs[i - 1, label])
                    count += 1
    words = sum(len(line.split()) for line in (text_corpus / "test.txt").read_text().splitlines())
    assert count == tested["test/tokens"] == data.test_tokens and tested["test/words"] == words
    assert tested["test/ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert tested["test/word_ppl"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    examples = module.test_examples
    assert examples["tokens"].sum() == count and examples["nll"].sum() == pytest.approx(nll, rel=1e-5)
    # Part of the split scored (trainer.limit_test_batches): its words in proportion to its tokens.
    (part,) = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, limit_test_batches=2
    ).test(module, datamodule=data, verbose=False)
    assert part["test/tokens"] < count and part["test/words"] == pytest.approx(
        words * part["test/tokens"] / count
    )


def _job(make_cfg, corpus: Path, folder: Path, *overrides: str) -> dict:
    return run(_cfg(make_cfg, corpus, *overrides), JobContext(folder=folder, choices=CHOICES))


def test_learned_decoder_has_learned_and_loads_from_its_folder(
    make_cfg, text_corpus: Path, learned_decoder: LearnedDecoder, tmp_path: Path
) -> None:
    """The hub path (`model.name_or_path`) on a folder: its weights and tokenizer, untrained further,
    give the perplexity the fixture measured; a 512-token vocabulary at chance would give 512."""
    assert learned_decoder.test_ppl < 4
    results = _job(
        make_cfg,
        text_corpus,
        tmp_path,
        f"model.name_or_path={learned_decoder.folder}",
        "trainer.limit_train_batches=0",
        "benchmark=none",
    )
    assert results["status"] == "ok"
    assert results["metrics"]["test/ppl"] == pytest.approx(learned_decoder.test_ppl, rel=1e-5)
    assert results["metrics"]["baseline/unigram_word_ppl"] > 3 * results["metrics"]["test/word_ppl"]


# Each recipe's INT8 perplexity may exceed its reference's (PTQ: the FP32 model it converted; QAT:
# its fake-quant model) by at most this fraction on the learned tiny decoders, and its artifact must
# be below this share of FP32's bytes (pt2e: none; its embeddings stay float, and on a model this
# small the exported program's own bytes outweigh its weights).
RECIPE_BOUNDS = {
    "ptq_dynamic": (0.05, 0.6),
    "ptq_static": (0.10, 0.6),
    "qat_x86": (0.05, 0.6),
    "qat_x86_a8w7_float_out": (0.05, 0.6),
    "qat_torchao_int8": (0.05, 0.6),
    "qat_torchao_8da4w": (0.05, 0.6),
    "qat_pt2e_x86": (0.05, None),
}


# The weight-only recipes (no training or calibration: the FP32 model's weights converted), on the
# Llama family: int4 and NF4 store a 16-level weight, hence their wider bound. Their kernels pack
# 16 or 32 output rows at a time, which the tokenizer's vocabulary (the LM head's outputs) is not a
# multiple of: those two leave the LM head float (and the refusal without that is tested below).
WEIGHT_ONLY_BOUNDS = {
    "wo_packed_int8": (0.02, 0.6),
    "wo_packed_int4": (0.15, 0.6),
    "wo_torchao_int8": (0.02, 0.6),
    "ptq_torchao_8da4w": (0.15, 0.6),
    "wo_bnb_int8": (0.02, 0.6),
    "wo_bnb_nf4": (0.15, 0.6),
}


@pytest.mark.parametrize("recipe", [recipe_case(r, ("qat_x86",)) for r in RECIPE_BOUNDS])
def test_every_recipe_on_both_decoder_families(
    make_cfg, text_corpus: Path, learned_decoder: LearnedDecoder, tmp_path: Path, recipe: str
) -> None:
    """prepare -> train 4 steps -> convert -> test -> save; the artifact, reloaded here into a fresh
    skeleton, scores the test split exactly as the job's INT8 model did."""
    _recipe_end_to_end(make_cfg, text_corpus, learned_decoder, tmp_path, recipe, RECIPE_BOUNDS[recipe])


@pytest.mark.parametrize("learned_decoder", ["llama_tiny"], indirect=True)
@pytest.mark.parametrize(
    "recipe",
    [recipe_case(r, ("wo_packed_int4", "wo_torchao_int8", "wo_bnb_nf4")) for r in WEIGHT_ONLY_BOUNDS],
)
def test_every_weight_only_recipe_end_to_end(
    make_cfg, text_corpus: Path, learned_decoder: LearnedDecoder, tmp_path: Path, recipe: str
) -> None:
    packs_rows = recipe in ("wo_packed_int4", "wo_bnb_nf4")
    head = ["quant.targets.exclude=[lm_head]"] if packs_rows else []
    _recipe_end_to_end(
        make_cfg, text_corpus, learned_decoder, tmp_path, recipe, WEIGHT_ONLY_BOUNDS[recipe], *head
    )


@pytest.mark.parametrize("learned_decoder", ["llama_tiny"], indirect=True)
def test_a_linear_the_int4_kernel_cannot_pack_is_refused_before_training(
    make_cfg, text_corpus: Path, learned_decoder: LearnedDecoder, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"lm_head has \d+ outputs; quant.api=packed packs int4 weights 16"):
        _job(
            make_cfg,
            text_corpus,
            tmp_path,
            f"model.name_or_path={learned_decoder.folder}",
            "quant=wo_packed_int4",
        )
    assert not (tmp_path / "checkpoints").exists()


def _recipe_end_to_end(
    make_cfg,
    text_corpus: Path,
    learned_decoder: LearnedDecoder,
    tmp_path: Path,
    recipe: str,
    bounds: tuple[float, float | None],
    *overrides: str,
) -> None:
    results = _job(
        make_cfg,
        text_corpus,
        tmp_path,
        f"model.name_or_path={learned_decoder.folder}",
        f"quant={recipe}",
        "trainer.max_steps=4",
        "model.optim.lr=1e-4",
        "quant.calibration_batches=4",
        "benchmark=none",
        *overrides,
    )
    assert results["status"] == "ok", results["error"]
    metrics, model = results["metrics"], results["model"]
    reference = metrics.get("test/ppl_float", metrics.get("test/ppl_fakequant"))
    tolerance, size_bound = bounds
    assert metrics["test/ppl"] <= reference * (1 + tolerance)
    head_kept_float = "quant.targets.exclude=[lm_head]" in overrides
    assert model["quantized_modules"] >= 2 * 7 and model["lm_head_quantized"] != head_kept_float
    assert size_bound is None or metrics["model/size_ratio"] < size_bound

    cfg = _cfg(
        make_cfg, text_corpus, f"model.name_or_path={learned_decoder.folder}", f"quant={recipe}", *overrides
    )
    task = CausalLMTask(cfg)
    data = task.data_module()
    data.setup()
    hf_config = AutoConfig.from_pretrained(tmp_path / MODEL_CONFIG_FILE)
    reloaded = make_recipe(cfg.quant).load(
        tmp_path / model["artifact"],
        lambda: build_model_from_config(hf_config, cfg.attention, task.auto_model),
    )
    import lightning as L

    (tested,) = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(
        task.lightning_module(reloaded, data), datamodule=data, verbose=False
    )
    assert tested["test/ppl"] == pytest.approx(metrics["test/ppl"], rel=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=synthetic"], "data.kind='classification' is data for another task; task=causal_lm reads"),
        (["data.max_length=300"], "data.max_length=300 exceeds the model's position limit 256"),
        (["data.eval_length=512"], "data.eval_length=512 exceeds the model's position limit 256"),
        (
            ["quant=qat_x86", "quant.targets.include=[*intermediate.dense]"],
            r"match no nn.Linear; this model's Linear layers are named like \['model.layers.0.self_attn.q_proj'",
        ),
        (["data.eval_stride=32"], "data.eval_stride=32 must be < the evaluation length 32"),
    ],
)
def test_refusals(make_cfg, text_corpus: Path, tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _job(make_cfg, text_corpus, tmp_path, *overrides)


def test_a_split_from_a_file_and_from_the_holdout_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"data.holdout and data.files both give the split\(s\) \['test'\]"):
        DataConfig(path="corpus", kind="causal_lm", files={"test": "test.txt"}, holdout={"test": 0.2})


def test_classification_refuses_language_modelling_data(make_cfg, text_corpus: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"data\.kind='causal_lm' is data for another task; task=classification"
    ):
        to_config(make_cfg("data=text", f"data.path={text_corpus}"))


def test_rope_scaling_lifts_the_position_limit(make_cfg, text_corpus: Path) -> None:
    scaled = "+model.arch.rope_parameters={rope_type: linear, factor: 4.0, rope_theta: 10000.0}"
    cfg = _cfg(make_cfg, text_corpus, "data.max_length=300", scaled)
    checked = preflight(cfg, CausalLMTask(cfg))  # no refusal
    assert checked.task.data_kind == "causal_lm"
