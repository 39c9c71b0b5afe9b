"""One job of a sweep, top to bottom: checks, data, model, fit, test, latency, record.

Everything that can refuse the job (config ranges, attention on this device, sequence length
against the model's positions) runs before the first training batch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qatflash.attention import check_attention, check_padding_support
from qatflash.bench import Contender, measure_side_by_side
from qatflash.bench.onnx import (
    ORT_INT8_METHOD,
    ORT_INT8_SETTINGS,
    OrtModel,
    check_onnxruntime,
    export_onnx,
    quantize_onnx,
    weight_matmul_coverage,
)
from qatflash.bench.saved_run import MODEL_CONFIG_FILE
from qatflash.callbacks import FitStart, RngState
from qatflash.config import Config, ConfigError, QuantConfig
from qatflash.data import TextClassificationData
from qatflash.finetune_cache import FinetuneCache
from qatflash.fit_plan import FitPlan
from qatflash.models import (
    build_model,
    build_model_from_config,
    declared_config,
    load_tokenizer,
    max_positions,
    model_config,
    training_call,
)
from qatflash.module import SequenceClassifier
from qatflash.quant import QuantizationAwareTraining, Recipe, make_recipe
from qatflash.quant.artifact import serialized_bytes
from qatflash.results import RunRecord, environment, summary_figures
from qatflash.storage import SafeCheckpointIO
from qatflash.tracking import Tracker

log = logging.getLogger(__name__)

# Where results go, whether a finished point is redone or its training shared, what a sweeper reads:
# none of them changes a figure.
_NOT_RESULT_KEYS = ("logger", "force", "sweep_name", "reuse_fp32", "keep_checkpoints", "objective")
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = f"{CHECKPOINT_DIR}/last.ckpt"


@dataclass
class JobContext:
    """Where a job writes and how it names itself; filled from Hydra by the CLI."""

    folder: Path
    choices: dict[str, str]
    overrides: list[str] = field(default_factory=list)
    group: str = "default"
    resolved_config: dict[str, Any] = field(default_factory=dict)
    # The sweep's folder when the job is one point of a multirun: what its points may share.
    sweep_dir: Path | None = None

    @property
    def config_hash(self) -> str:
        """What the job computes: its resolved config, less the keys that cannot change a result."""
        relevant = {k: v for k, v in self.resolved_config.items() if k not in _NOT_RESULT_KEYS}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator} but no CUDA device is visible; use cpu or auto"
            )
        return torch.device("cuda")
    return torch.device(accelerator if accelerator == "mps" else "cpu")


def run_name(cfg: Config, choices: dict[str, str]) -> str:
    parts = [choices.get(g, "?") for g in ("model", "data", "quant", "attention")]
    if cfg.attention.sdpa_backend:
        parts[-1] += f"-{cfg.attention.sdpa_backend}"
    return "-".join([*parts, f"L{cfg.data.max_length}", f"s{cfg.seed}"])


def job_params(cfg: Config, overrides: list[str]) -> dict[str, Any]:
    return {
        "max_length": cfg.data.max_length,
        "batch_size": cfg.data.batch_size,
        "precision": str(cfg.trainer.precision),
        "seed": cfg.seed,
        "sdpa_backend": cfg.attention.sdpa_backend,
        "train_subset": cfg.data.train_subset,
        "max_epochs": cfg.trainer.max_epochs,
        "max_steps": cfg.trainer.max_steps,
        "lr": cfg.model.optim.lr,
        "bench_batch_size": cfg.benchmark.batch_size,
        "bench_seq_len": cfg.benchmark.seq_len or cfg.data.max_length,
        "overrides": overrides,
    }


def run(cfg: Config, job: JobContext) -> dict[str, Any]:
    """Run one job and return its results; raises (after recording `failed`) when any step fails."""
    params = job_params(cfg, job.overrides)
    wandb_config = {**job.choices, **params, "experiment": cfg.experiment_name, "config": job.resolved_config}
    record = RunRecord(job.folder, job.choices, params, job.config_hash)
    tracker_args = (run_name(cfg, job.choices), job.group, "train", wandb_config)
    with record, Tracker(cfg.logger, job.folder, *tracker_args) as tracker:
        record.data["warnings"] = tracker.warnings  # the same list: warnings at finish land too
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        device = resolve_device(cfg.trainer.accelerator)
        record.update("env", environment(device))
        precision = str(cfg.trainer.precision)
        training = training_call(declared_config(cfg.model))
        check_attention(cfg.attention, precision, device, training)
        if cfg.benchmark.enabled and "onnxruntime" in cfg.benchmark.backends:
            check_onnxruntime()
        recipe = make_recipe(cfg.quant) if cfg.quant.method != "none" else None
        qat = None
        if recipe is not None and cfg.quant.method == "qat":
            qat = QuantizationAwareTraining(
                recipe, cfg.quant.fake_quant_start_step, cfg.quant.freeze_observers_step
            )
        fit_start = FitStart()
        trainer = L.Trainer(
            **asdict(cfg.trainer),
            logger=tracker.lightning_logger,
            default_root_dir=str(job.folder),
            callbacks=[*([qat] if qat is not None else []), *_checkpointing(job.folder), fit_start],
            plugins=[SafeCheckpointIO()],
        )

        data = TextClassificationData(cfg.data, partial(load_tokenizer, cfg.model), cfg.seed)
        plan = FitPlan.of(trainer, data.train_size, cfg.data.batch_size)
        record.update("params", {"optimizer_steps": plan.steps})
        if qat is not None:
            qat.check_schedule(plan)  # counted from the indexed data, before tokenizing or building
        data.setup()
        check_padding_support(cfg.attention, precision, device, data.pads_batches, training)
        hf_config = model_config(cfg.model, data.num_labels, vocab_size=len(data.tokenizer))
        bench_len = cfg.benchmark.seq_len or cfg.data.max_length
        _check_length(hf_config, ("data.max_length", cfg.data.max_length), ("benchmark.seq_len", bench_len))
        model = build_model(cfg.model, cfg.attention, hf_config)
        hf_config.to_json_file(job.folder / MODEL_CONFIG_FILE)  # rebuilds the artifact's skeleton later
        module = SequenceClassifier(model, cfg.model.optim, data.num_labels, cfg.attention.sdpa_backend)
        record.update(
            "model", {"parameters": sum(p.numel() for p in model.parameters()), "num_labels": data.num_labels}
        )
        float_model = None
        if recipe is not None:
            recipe.select_targets(model)  # patterns that match nothing are refused now, not after training
        if qat is not None:
            float_model = copy.deepcopy(model)  # the FP32 twin (not fine-tuned): for size and latency only
            # Prepared now, not only in the callback's setup: a spawned (DDP) fit hands its trained
            # weights back by loading them, non-strictly, into this process's modules.
            qat.prepare(module)
        shared = cfg.reuse_fp32 and qat is None and job.sweep_dir is not None
        cache = FinetuneCache(job.sweep_dir, cfg) if shared else None
        started = time.perf_counter()
        metrics = cache.load(module.model) if cache is not None else None
        if metrics is None:
            resume = _resumable(job.folder, record.previous, job.config_hash, cfg.force)
            if resume is not None:
                record.data["resumed_from"] = {
                    "checkpoint": LAST_CHECKPOINT,
                    "attempt": record.previous["attempt"],
                }
                log.info("resuming attempt %d from %s", record.previous["attempt"], resume)
            trainer.fit(module, datamodule=data, ckpt_path=resume)
            if resume is not None:
                record.data["resumed_from"]["global_step"] = fit_start.step  # None after a spawned fit
            metrics = _val_metrics(trainer)
            if not metrics:  # resumed from the final epoch's checkpoint: nothing left to train
                trainer.validate(module, datamodule=data, verbose=False)
                metrics = _val_metrics(trainer)
            if cache is not None:
                cache.save(module.model, metrics)
        elif cache is not None:
            record.update("model", {"fp32_reused_from": str(cache.path)})
        record.update("timing", {"fit_s": round(time.perf_counter() - started, 3)})
        started = time.perf_counter()
        tested = _test(_single_process(trainer, cfg), module, data)
        record.update("timing", {"test_s": round(time.perf_counter() - started, 3)})

        int8, prepared = None, None
        if recipe is None:
            metrics.update(tested)
            float_model = module.model
        else:
            metrics.update(_suffixed(tested, "fakequant" if qat else "fp32"))
            float_model = float_model or module.model  # PTQ quantizes a copy; this one stays FP32
            if qat is not None:
                # After a spawned fit the callback converted in a worker process: convert here.
                prepared = module.model
                int8 = qat.int8_model if qat.int8_model is not None else qat.to_int8(prepared)
            else:
                prepared = _calibrated(recipe, module.model, data, cfg.quant)
                int8 = recipe.convert(copy.deepcopy(prepared))
            skeleton = partial(build_model_from_config, hf_config, cfg.attention)
            metrics.update(_record_int8(record, job.folder, recipe, int8, float_model, skeleton, data))
            module.model = int8
            metrics.update(_int8_metrics(_test(_cpu_trainer(), module, data), metrics))
        onnx: dict[str, torch.nn.Module] = {}
        if cfg.benchmark.enabled and "onnxruntime" in cfg.benchmark.backends:
            onnx = _onnxruntime_models(
                record, job.folder, float_model, (recipe, prepared), data, cfg.benchmark.threads
            )
            for variant, session in onnx.items():
                if qat is not None and variant != "int8_qdq":
                    continue  # QAT's FP32 twin is the model before fine-tuning: timed, never tested
                module.model = session
                metrics.update(_suffixed(_test(_cpu_trainer(), module, data), f"ort_{variant}"))
        record.update("metrics", metrics)

        if cfg.benchmark.enabled:
            started = time.perf_counter()
            timed_models = _timed_models(cfg, recipe, float_model, int8, onnx, device, data.num_labels)
            rows = latency_rows(cfg, timed_models, bench_len, hf_config.vocab_size)
            record.update("latency", rows)
            record.update("timing", {"bench_s": round(time.perf_counter() - started, 3)})
        tracker.summarize(summary_figures(record.data))
        if not cfg.keep_checkpoints:
            shutil.rmtree(job.folder / CHECKPOINT_DIR, ignore_errors=True)
    return record.data


def _checkpointing(folder: Path) -> list[L.Callback]:
    """Epoch-end `checkpoints/last.ckpt` with the RNG states: what a killed job resumes from.

    Epoch ends, because Lightning resumes a plain DataLoader mid-epoch only approximately (it
    restarts the epoch's batches); from an epoch end the resumed run is the uninterrupted one.
    """
    # One file, replaced every epoch (Lightning writes `save_last` copies only beside a top-k file).
    last = ModelCheckpoint(
        dirpath=folder / CHECKPOINT_DIR, filename=Path(LAST_CHECKPOINT).stem, enable_version_counter=False
    )
    return [last, RngState()]


def _resumable(folder: Path, previous: dict[str, Any] | None, config_hash: str, force: bool) -> str | None:
    """The checkpoint of an earlier, unfinished attempt of this same job in this folder, if any.

    An ok attempt is redone from scratch, and so is one of another config (its checkpoint is
    overwritten); force=true always starts over.
    """
    checkpoint = folder / LAST_CHECKPOINT
    unfinished = previous is not None and previous.get("status") != "ok"
    same_job = previous is not None and previous.get("config_hash") == config_hash
    return str(checkpoint) if unfinished and same_job and not force and checkpoint.is_file() else None


def _val_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def _test(trainer: L.Trainer, module: SequenceClassifier, data: TextClassificationData) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.test(module, datamodule=data, verbose=False)[0].items()}


def _int8_metrics(tested: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """The INT8 model is what ships: its figures are test/*, also kept as test/*_int8, with the delta to FP32."""
    metrics = {**tested, **_suffixed(tested, "int8")}
    if "test/acc_fp32" in before:
        metrics["test/acc_delta"] = tested["test/acc"] - before["test/acc_fp32"]
    return metrics


def _suffixed(metrics: dict[str, float], suffix: str) -> dict[str, float]:
    return {f"{k}_{suffix}": v for k, v in metrics.items()}


def _single_process(trainer: L.Trainer, cfg: Config) -> L.Trainer:
    """`trainer`, or for a distributed fit a one-device twin: a distributed test would split the
    test set across processes, padding it with repeated sentences. The twin logs nothing: the
    logger's state lives in the fit's worker processes; the test figures reach results.json and
    the W&B summary like every other figure."""
    if trainer.world_size == 1:
        return trainer
    single = {**asdict(cfg.trainer), "devices": 1, "num_nodes": 1, "strategy": "auto"}
    return L.Trainer(**single, logger=False, default_root_dir=trainer.default_root_dir)


def _cpu_trainer() -> L.Trainer:
    """INT8 kernels are CPU kernels, whatever device trained the model."""
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )


def _calibrated(
    recipe: Recipe, model: torch.nn.Module, data: TextClassificationData, cfg: QuantConfig
) -> torch.nn.Module:
    """A prepared copy of the fine-tuned model, its observers fed calibration batches (static PTQ)."""
    model = recipe.prepare(copy.deepcopy(model).cpu().train())
    if cfg.method == "ptq_static":
        model.eval()
        with torch.inference_mode():
            for _, batch in zip(range(cfg.calibration_batches), data.train_dataloader(), strict=False):
                model(**{k: v for k, v in batch.items() if k != "labels"})
    return model


def _record_int8(
    record: RunRecord,
    folder: Path,
    recipe: Recipe,
    int8: torch.nn.Module,
    float_model: torch.nn.Module,
    skeleton: Any,
    data: TextClassificationData,
) -> dict[str, float]:
    """Save the INT8 artifact, prove it reloads to identical logits, record sizes; returns metrics."""
    path = folder / recipe.artifact_name
    int8_bytes = recipe.save(int8, path)
    reloaded = recipe.load(path, skeleton)
    batch = {k: v for k, v in next(iter(data.test_dataloader())).items() if k != "labels"}
    int8.eval()  # not chained: exported graphs' eval() returns None
    with torch.inference_mode():
        if not torch.equal(int8(**batch).logits, reloaded(**batch).logits):
            raise RuntimeError(f"the INT8 artifact {path} does not reproduce the model's logits")
    fp32_bytes = serialized_bytes(float_model)
    record.update(
        "model",
        {
            "int8_artifact": path.name,
            "int8_bytes": int8_bytes,
            "fp32_bytes": fp32_bytes,
            "quantized_modules": recipe.count_quantized(int8),
        },
    )
    return {"model/size_ratio": int8_bytes / fp32_bytes}


def latency_rows(
    cfg: Config,
    timed_models: dict[tuple[str, str], Contender],
    seq_len: int,
    vocab_size: int,
) -> list[dict[str, Any]]:
    """One latency record per (variant, backend): what was timed, how, the figures, and its latency
    over the first FP32 row's, paired round by round (the figure an INT8-vs-FP32 decision reads)."""
    timed = measure_side_by_side(timed_models, cfg.benchmark, seq_len, vocab_size)
    reference = next(key for key in timed if key[0] == "fp32")
    rows = []
    for (variant, backend), result in timed.items():
        device = timed_models[variant, backend].device
        # ONNX Runtime runs the FP32 export in float32 whatever the training precision.
        fp32_precision = "32-true" if backend == "onnxruntime" else str(cfg.trainer.precision)
        row = {
            "variant": variant,
            "precision": "int8" if variant == "int8" else fp32_precision,
            "backend": backend,
            "device": device.type,
            "threads": cfg.benchmark.threads or torch.get_num_threads(),
            "seq_len": seq_len,
            "batch_size": cfg.benchmark.batch_size,
            "timer": "cuda_event" if device.type == "cuda" else "perf_counter",
            **result.stats.as_dict(),
        }
        if (variant, backend) != reference:
            paired = result.ratio_to(timed[reference])
            row.update({f"{key}_to_fp32": value for key, value in paired.items()})
            row["ratio_reference"] = "/".join(reference)
        rows.append(row)
    return rows


def _timed_models(
    cfg: Config,
    recipe: Recipe | None,
    float_model: torch.nn.Module,
    int8: torch.nn.Module | None,
    onnx: dict[str, torch.nn.Module],
    device: torch.device,
    num_labels: int,
) -> dict[tuple[str, str], Contender]:
    """(variant, backend) -> the model to time, where, in which dtype. INT8 and ONNX Runtime run on the CPU.

    Each is wrapped as the job's LightningModule, so timing runs the forward that testing ran
    (with any forced SDPA kernel). A recipe whose INT8 runs only compiled (pt2e) is timed under
    torch_compile, whichever torch backend was asked for, and once.
    """
    cpu = torch.device("cpu")

    def contender(model: torch.nn.Module, on: torch.device, autocast: torch.dtype | None = None) -> Contender:
        wrapped = SequenceClassifier(model, cfg.model.optim, num_labels, cfg.attention.sdpa_backend)
        return Contender(wrapped.to(on), on, autocast)

    timed: dict[tuple[str, str], Contender] = {}
    for backend in cfg.benchmark.backends:
        if backend == "onnxruntime":
            timed.update({(variant, backend): contender(m, cpu) for variant, m in onnx.items()})
            continue
        timed["fp32", backend] = contender(
            _on(backend, float_model), device, _AUTOCAST.get(str(cfg.trainer.precision))
        )
        if int8 is not None and recipe is not None:
            int8_backend = "torch_compile" if recipe.compiled_only else backend
            timed["int8", int8_backend] = contender(_on(int8_backend, int8), cpu)
    return timed


def _on(backend: str, model: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(model) if backend == "torch_compile" else model


def _onnxruntime_models(
    record: RunRecord,
    folder: Path,
    float_model: torch.nn.Module,
    quantized: tuple[Recipe | None, torch.nn.Module | None],
    data: TextClassificationData,
    threads: int | None,
) -> dict[str, torch.nn.Module]:
    """ONNX Runtime sessions, sizes recorded: the FP32 export (`fp32`), ONNX Runtime's dynamic INT8
    of it (`int8`, the deployment baseline), and the recipe's own quantization as a QDQ graph
    (`int8_qdq`) where the recipe has one, or the reason it has none."""
    paths = {"fp32": folder / "model_fp32.onnx", "int8": folder / "model_int8_ort.onnx"}
    example = {k: v for k, v in next(iter(data.test_dataloader())).items() if k != "labels"}
    model = copy.deepcopy(float_model).float().cpu()
    max_len = max_positions(model.config)
    sizes = {"onnx_fp32_bytes": export_onnx(model, paths["fp32"], example, max_len)}
    sizes["onnx_int8_bytes"] = quantize_onnx(paths["fp32"], paths["int8"])
    coverage = weight_matmul_coverage(paths["fp32"], paths["int8"])
    if coverage["float"]:
        record.data["warnings"].append(
            f"ONNX Runtime's dynamic INT8 left {coverage['float']} of {coverage['weight_matmuls']} weight "
            "matmuls in float: its onnxruntime int8 rows are partly FP32"
        )
    record.update(
        "model",
        {
            **sizes,
            "onnx_int8_method": ORT_INT8_METHOD,
            "onnx_int8_settings": ORT_INT8_SETTINGS,
            "onnx_int8_weight_matmuls": coverage,
        },
    )
    recipe, prepared = quantized
    if recipe is not None and prepared is not None:
        if (reason := recipe.qdq_unavailable()) is None:
            paths["int8_qdq"] = folder / "model_int8_qdq.onnx"
            qdq_bytes = export_onnx(recipe.qdq_model(prepared), paths["int8_qdq"], example, max_len)
            record.update("model", {"onnx_int8_qdq_bytes": qdq_bytes})
        else:
            record.update("model", {"onnx_int8_qdq_skipped": reason})
    threads = threads or torch.get_num_threads()
    return {variant: OrtModel(path, threads) for variant, path in paths.items()}


def _check_length(hf_config: Any, *lengths: tuple[str, int]) -> None:
    limit = max_positions(hf_config)
    for name, value in lengths:
        if limit is not None and value > limit:
            raise ConfigError(f"{name}={value} exceeds the model's position limit {limit}; use <= {limit}")
