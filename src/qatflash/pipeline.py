"""One `qatflash` job as named stages, top to bottom:

    preflight -> data -> model -> fit (or the sweep's shared FP32 fine-tune) -> ship -> evaluate -> time -> record

Each stage returns a frozen result that the next ones read; nothing is swapped inside a shared
object. Every refusal that needs no data runs in preflight, before the tracker starts; those that
need the data (the QAT schedule against the fit's steps, a kernel against padding) run as soon as
it is indexed, before the first batch. The task (classification or causal_lm) supplies what is
particular to it; quantization APIs and timing backends are looked up by name.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from transformers import PretrainedConfig

from qatflash import sensitivity, slurm
from qatflash.attention import (
    PADDED_BATCHES,
    TrainingCall,
    check_attention,
    check_mask_support,
    forced_kernel,
    masked_decode,
)
from qatflash.callbacks import FitStart
from qatflash.config import PRECISIONS, Config
from qatflash.distill import load_teacher, teacher_source
from qatflash.errors import require
from qatflash.finetune_cache import FinetuneCache
from qatflash.fit_plan import FitPlan
from qatflash.job import (
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    REFERENCE_KEYS,
    JobContext,
    checkpointing,
    environment,
    open_job,
    resolve_device,
    resumable,
    unfinished,
)
from qatflash.models import (
    build_model,
    build_model_from_config,
    check_positions,
    declared_config,
    max_positions,
    model_on_meta,
    timed_length_key,
    training_call,
)
from qatflash.module import LearnedRanges
from qatflash.quant import make_recipe
from qatflash.quant.callback import QuantizationAwareTraining, fake_quant_start
from qatflash.quant.recipe import Recipe
from qatflash.quant.ship import Shipped, saved, ship
from qatflash.results import (
    FAKEQUANT,
    FLOAT,
    FRONT_FILE,
    MIXES_DIR,
    MODEL_CONFIG_FILE,
    QUANTIZED,
    SENSITIVITY_FILE,
    RunRecord,
    summary_figures,
)
from qatflash.sensitivity.measure import Subject, candidates
from qatflash.storage import SafeCheckpointIO
from qatflash.tasks import TASKS
from qatflash.tasks.task import Task, tester
from qatflash.timing import TIMING_BACKENDS
from qatflash.timing.attention_profile import add_attention
from qatflash.timing.backends import BackendModels, JobTiming, TimingBackend
from qatflash.timing.generation import generation_figures, generation_rounds
from qatflash.timing.latency import Contender, measure_side_by_side
from qatflash.timing.pairing import Conditions, paired_ratios
from qatflash.timing.roofline import add_roofline, device_ceilings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checked:
    """What preflight established: the device, the recipe and QAT schedule, the timing backends, and
    why the quantized model cannot be shipped on this machine (None: it can, or there is none)."""

    task: Task
    device: torch.device
    training: TrainingCall
    recipe: Recipe | None
    qat: QuantizationAwareTraining | None
    backends: dict[str, TimingBackend]
    unshipped: str | None = None


@dataclass(frozen=True)
class Data:
    module: L.LightningDataModule
    plan: FitPlan


@dataclass(frozen=True)
class Built:
    hf_config: PretrainedConfig
    model: nn.Module


@dataclass(frozen=True)
class Fitted:
    """The trained model (QAT: prepared and trained), QAT's FP32 twin, and what the fit measured."""

    model: nn.Module
    twin: nn.Module | None
    val_metrics: dict[str, float]
    record: dict[str, Any]  # results.json's sections this stage fills (model, resumed_from)
    seconds: float


@dataclass(frozen=True)
class Evaluated:
    metrics: dict[str, float]
    backends: list[BackendModels]
    seconds: float
    examples: dict[str, dict[str, Any]]  # per tested model (by metric suffix): per-example columns


def run(cfg: Config, job: JobContext) -> dict[str, Any]:
    """Run one job and return its results; raises (after recording `failed`) when any stage fails."""
    task = TASKS.load(cfg.task.name)(cfg)
    params = job_params(cfg, job.overrides)
    with open_job(job, cfg.logger, cfg.seed, params) as opened:
        checked = preflight(cfg, task)
        teacher = teacher_source(cfg, job.sweep_dir) if cfg.quant.distill is not None else None
        slurm.refuse_hpc_checkpoints(job.folder)
        opened.record.update("env", environment(checked.device))
        trainer = _trainer(cfg, job, checked)
        data = load_data(cfg, checked, trainer)
        built = build(cfg, checked, data, job)
        # Tracking starts once every refusal has passed: a refused job prints its one line only.
        forced = [cfg.attention.sdpa_backend] if cfg.attention.sdpa_backend else []
        name = job.run_name(*forced, f"L{cfg.data.max_length}", f"s{cfg.seed}")
        tracker = opened.track(name, "train", _tracked_config(cfg, job, params))
        trainer.logger = tracker.logger
        fitted = fit(cfg, job, opened.record.previous, checked, trainer, data, built, teacher)
        if not trainer.is_global_zero:  # one task of a multi-task (srun) DDP fit
            log.info("rank %d of %d: fit done; rank 0 goes on alone", trainer.global_rank, trainer.world_size)
            return opened.record.data
        if cfg.sensitivity is not None:
            opened.record.data["sensitivity"] = sensitivity_stage(
                cfg, checked, data, fitted, job, opened.record
            )
            for table in (SENSITIVITY_FILE, FRONT_FILE):
                tracker.table(f"sensitivity/{Path(table).stem}", job.folder / table)
        shipped = ship_stage(cfg, checked, data, built, fitted, job)
        evaluated = evaluate(cfg, checked, trainer, data, fitted, shipped, job)
        started = time.perf_counter()
        latency = time_models(cfg, checked, data, built, shipped, evaluated) if cfg.benchmark.enabled else []
        bench_s = round(time.perf_counter() - started, 3) if cfg.benchmark.enabled else None
        record_results(opened.record, task, data, built, fitted, shipped, evaluated, latency, bench_s)
        tracker.summarize(summary_figures(opened.record.data))
        if not cfg.keep_checkpoints:
            shutil.rmtree(job.folder / CHECKPOINT_DIR, ignore_errors=True)
    return opened.record.data


def job_params(cfg: Config, overrides: list[str]) -> dict[str, Any]:
    return {
        "max_length": cfg.data.max_length,
        "batch_size": cfg.data.batch_size,
        "precision": str(cfg.trainer.precision),
        "seed": cfg.seed,
        "quant_method": cfg.quant.method,
        "sdpa_backend": cfg.attention.sdpa_backend,
        "train_subset": cfg.data.train_subset,
        "max_epochs": cfg.trainer.max_epochs,
        "max_steps": cfg.trainer.max_steps,
        "lr": cfg.optim.lr,
        "bench_batch_size": cfg.benchmark.batch_size,
        "bench_seq_len": cfg.benchmark.seq_len or cfg.data.max_length,
        "overrides": overrides,
    }


def _tracked_config(cfg: Config, job: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """The tracker's run config: the flat choices and params (for W&B's panels) beside the whole config."""
    return {**job.choices, **params, "experiment": cfg.experiment_name, "config": job.resolved_config}


def preflight(cfg: Config, task: Task, probe_kernel: bool = True) -> Checked:
    """Every refusal that needs no data: device, SLURM tasks against the trainer's devices, lengths
    against the model's positions, attention as training will call it, the timing backends'
    extras, the quantization engine and whether its target runs here. Nothing is loaded and no
    tracker has started. Without
    `probe_kernel` a forced SDPA kernel is not tried on the device (a dry run's CUDA is faked)."""
    device = resolve_device("trainer.accelerator", cfg.trainer.accelerator)
    slurm.check_tasks(cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes)
    declared = declared_config(cfg.model)
    training = training_call(declared)
    # a generation's last decode step sits new_tokens past the prompt
    timed = (cfg.benchmark.seq_len or cfg.data.max_length) + cfg.benchmark.new_tokens
    lengths = {
        "data.max_length": cfg.data.max_length,
        "data.eval_length": cfg.data.eval_length,
        timed_length_key("benchmark.seq_len", cfg.benchmark.new_tokens): timed,
    }
    for name, length in lengths.items():
        if length is not None:
            check_positions(declared, name, length)
    check_attention(cfg.attention, str(cfg.trainer.precision), device, training, probe_kernel)
    if probe_kernel and cfg.benchmark.enabled:
        check_mask_support(cfg.attention, str(cfg.trainer.precision), device, masked_decode(cfg.benchmark))
    backends = (
        {name: TIMING_BACKENDS.create(name) for name in cfg.benchmark.backends}
        if cfg.benchmark.enabled
        else {}
    )
    for backend in backends.values():
        backend.check()
    recipe = make_recipe(cfg.quant) if cfg.quant.method != "none" else None
    unshipped = None
    if recipe is not None:
        # Patterns that match nothing, or match a module type or shape the recipe cannot quantize,
        # are refused now.
        recipe.select_targets(model_on_meta(declared, task.auto_model))
        unshipped = check_target(recipe)
    if cfg.sensitivity is not None:
        candidates(cfg.sensitivity.precisions, model_on_meta(declared, task.auto_model))
    if cfg.benchmark.enabled:
        task.check_timing(cfg.benchmark, recipe)
    qat = None
    if recipe is not None and cfg.quant.method == "qat":
        pretrained = cfg.model.name_or_path is not None
        require(
            cfg.quant.lora is None or importlib.util.find_spec("peft") is not None,
            "quant.lora needs peft, which is not installed: pip install 'qatflash[lora]'",
        )
        require(
            pretrained or cfg.quant.lora is None,
            "quant.lora needs a pretrained model (model.name_or_path): adapters beside a frozen, randomly "
            "initialised base (model.arch, trained from scratch) learn nothing",
        )
        start = fake_quant_start(cfg.quant.fake_quant_start_step, pretrained, recipe)
        qat = QuantizationAwareTraining(recipe, start, cfg.quant.freeze_observers_step, unshipped is None)
    return Checked(task, device, training, recipe, qat, backends, unshipped)


def check_target(recipe: Recipe) -> str | None:
    """Why the job cannot ship its quantized model here (None: it can). PTQ would have nothing to
    show, so it is refused; QAT trains with fake quantization, records that quality and its model as
    not shipped, unless the fake quantization itself needs the missing kernels (NVFP4)."""
    reason = recipe.unshippable()
    if reason is None:
        return None
    method = recipe.cfg.method
    require(method == "qat", f"quant.method={method} (quant.api={recipe.cfg.api}) cannot run here: {reason}")
    fake = recipe.fake_quant_unreachable()
    require(
        fake is None,
        f"quant.method=qat (quant.api={recipe.cfg.api}): even its fake quantization cannot run here: {fake}",
    )
    log.warning(
        "the quantized model will not be shipped: %s; QAT trains and is scored with fake quantization", reason
    )
    return reason


def _trainer(cfg: Config, job: JobContext, checked: Checked) -> L.Trainer:
    """The fit's Trainer; its logger is attached when tracking starts."""
    callbacks = [*([checked.qat] if checked.qat else []), *checkpointing(job.folder), FitStart()]
    return L.Trainer(
        **asdict(cfg.trainer),
        logger=False,
        default_root_dir=str(job.folder),
        callbacks=callbacks,
        plugins=[SafeCheckpointIO(), *slurm.lightning_plugins()],
    )


def load_data(cfg: Config, checked: Checked, trainer: L.Trainer) -> Data:
    """Index the data, check the QAT schedule against the fit's steps, then tokenize."""
    data = checked.task.data_module()
    plan = FitPlan.of(trainer, data.train_size, cfg.data.batch_size)
    if checked.qat is not None:
        checked.qat.check_schedule(plan)  # counted from the indexed rows, before tokenizing
    data.setup()
    padded = PADDED_BATCHES if data.pads_batches else None
    check_mask_support(cfg.attention, str(cfg.trainer.precision), checked.device, padded, checked.training)
    return Data(data, plan)


def build(cfg: Config, checked: Checked, data: Data, job: JobContext) -> Built:
    """The model in the task's head (its targets were checked in preflight, on its declared shape)."""
    hf_config = checked.task.model_config(data.module)
    model = build_model(cfg.model, cfg.attention, hf_config, checked.task.auto_model)
    hf_config.to_json_file(job.folder / MODEL_CONFIG_FILE)  # rebuilds the artifact's skeleton later
    return Built(hf_config, model)


def fit(
    cfg: Config,
    job: JobContext,
    previous: dict[str, Any] | None,
    checked: Checked,
    trainer: L.Trainer,
    data: Data,
    built: Built,
    teacher: Path | None = None,
) -> Fitted:
    """Train the built model (the fit owns it from here), resuming an unfinished attempt, or load the
    sweep's shared FP32 fine-tune. QAT keeps the FP32 twin of the model before training, and with
    `quant.distill` learns from the float teacher in `teacher` too."""
    started = time.perf_counter()
    twin = copy.deepcopy(built.model) if checked.qat is not None else None
    module = checked.task.lightning_module(built.model, data.module)
    if teacher is not None:
        assert cfg.quant.distill is not None
        # a skeleton (no pretrained weights read): the teacher's own weights replace every parameter
        student_like = build_model_from_config(built.hf_config, cfg.attention, checked.task.auto_model)
        module.distillation = load_teacher(teacher, student_like, cfg.quant.distill)
    if checked.qat is not None:
        # Prepared now, not only in the callback's setup: a spawned (DDP) fit hands its trained
        # weights back by loading them, non-strictly, into this process's modules.
        checked.qat.prepare(module)
        if cfg.quant.range_lr is not None:
            module.learned_ranges = LearnedRanges(cfg.quant.range_lr, checked.qat.recipe.range_parameters)
    shared = cfg.reuse_fp32 and checked.qat is None and job.sweep_dir is not None
    cache = FinetuneCache.of(job.sweep_dir, cfg) if shared else None
    metrics = cache.load(module.model) if cache is not None else None
    record: dict[str, Any] = {"model": {}, "resumed_from": None, "timing": {}, "params": {}}
    if checked.qat is not None:
        record["params"] = checked.qat.schedule()
    if cfg.quant.lora is not None:
        assert checked.qat is not None, "QuantConfig refuses quant.lora without QAT"
        trainable = checked.qat.trainable_parameters
        record["params"]["lora"] = {**asdict(cfg.quant.lora), "trainable_parameters": trainable}
    if module.learned_ranges is not None:
        ranges = module.learned_ranges.of(module.model)
        record["params"]["learned_ranges"] = {
            "tensors": len(ranges),
            "values": sum(p.numel() for p in ranges),
        }
    if teacher is not None:
        record["params"]["distill"] = {**asdict(cfg.quant.distill), "teacher": str(teacher)}
    if metrics is not None:
        record["model"]["float_reused_from"] = str(cache.path)
    else:
        metrics, record["resumed_from"] = _train(cfg, job, previous, trainer, module, data)
        record["timing"]["train_tokens_per_s"] = module.train_tokens_per_s
        if module.train_memory is not None:
            record["timing"].update({f"train_{k}": v for k, v in module.train_memory.items()})
        if cache is not None and trainer.is_global_zero:
            cache.save(module.model, metrics)
    return Fitted(module.model, twin, metrics, record, round(time.perf_counter() - started, 3))


def _train(
    cfg: Config,
    job: JobContext,
    previous: dict[str, Any] | None,
    trainer: L.Trainer,
    module: L.LightningModule,
    data: Data,
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Lightning's fit, from the epoch-end checkpoint of an unfinished attempt where there is one."""
    resume = resumable(job.folder, previous, job.config_hash, cfg.force)
    if resume is not None:
        log.info("resuming attempt %d from %s", previous["attempt"], resume)
    trainer.fit(module, datamodule=data.module, ckpt_path=resume)
    metrics = _val_metrics(trainer)
    if not metrics:  # resumed from the final epoch's checkpoint: nothing left to train
        trainer.validate(module, datamodule=data.module, verbose=False)
        metrics = _val_metrics(trainer)
    if torch.distributed.is_initialized():
        # A fit across tasks (srun) ends with its process group: rank 0 goes on alone, and what it
        # tests and logs next must not wait for peers that have left.
        torch.distributed.destroy_process_group()
    if resume is None:
        return metrics, None
    start = next(c for c in trainer.callbacks if isinstance(c, FitStart))
    # The step training took up from (None after a spawned fit: its callbacks ran in the workers).
    return metrics, {"checkpoint": LAST_CHECKPOINT, "attempt": previous["attempt"], "global_step": start.step}


def _val_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def ship_stage(
    cfg: Config, checked: Checked, data: Data, built: Built, fitted: Fitted, job: JobContext
) -> Shipped:
    """The float model, or its quantized form saved as the run's artifact and proven to reload; or,
    where this machine cannot make it (QAT only), the record that it was not shipped and why."""
    if checked.recipe is None:
        return Shipped(fitted.model, True)
    if checked.unshipped is not None:
        assert fitted.twin is not None, "only QAT trains where its target does not run"
        record = {**checked.recipe.product_record(), "not_shipped": checked.unshipped}
        return Shipped(fitted.twin, False, checked.recipe, fitted.model, record=record)
    batches = partial(_calibration_batches, data, cfg.quant.calibration_batches)
    shipped = ship(checked.recipe, fitted.model, checked.qat, fitted.twin, batches)
    skeleton = partial(build_model_from_config, built.hf_config, cfg.attention, checked.task.auto_model)
    return saved(shipped, job.folder, skeleton, checked.task.example_inputs(data.module))


def sensitivity_stage(
    cfg: Config, checked: Checked, data: Data, fitted: Fitted, job: JobContext, record: RunRecord
) -> dict[str, Any]:
    """The fine-tuned float model's per-group sensitivity on the validation split, and the mixes
    searched from it, written under the sweep's (or, alone, the job's) MIXES_DIR; an unfinished
    attempt of this job is taken up at the group it reached."""
    calibration = partial(_calibration_batches, data)
    subject = Subject(checked.task, data.module, fitted.model, checked.device, calibration)
    return sensitivity.run(
        cfg,
        subject,
        job.folder,
        (job.sweep_dir or job.folder) / MIXES_DIR,
        mix_prefix(cfg, job),
        unfinished(record.previous, job.config_hash, cfg.force),
    )


def mix_prefix(cfg: Config, job: JobContext) -> str:
    """What a float point's mixes are named by: its length and seed, which a reader looks for, and
    the hash of its float model's config, which tells apart the points of a sweep over anything else."""
    return f"mix_L{cfg.data.max_length}_s{cfg.seed}_{job.hash_without(*REFERENCE_KEYS)[:6]}"


def _calibration_batches(data: Data, count: int) -> list[dict[str, torch.Tensor]]:
    batches = zip(range(count), data.module.train_dataloader(), strict=False)
    return [{k: v for k, v in batch.items() if k != "labels"} for _, batch in batches]


def evaluate(
    cfg: Config,
    checked: Checked,
    trainer: L.Trainer,
    data: Data,
    fitted: Fitted,
    shipped: Shipped,
    job: JobContext,
) -> Evaluated:
    """Test what the job trained (float, or QAT's fake-quant model), the quantized model it ships,
    and the models a timing backend makes of them (ONNX Runtime's), on the task's test split; each
    model's per-example results are kept under the suffix of its metrics (float, fakequant,
    quantized, ort_int8)."""
    started = time.perf_counter()
    trained = FAKEQUANT if checked.qat is not None else FLOAT
    tested, examples = _test(_single_process(trainer, cfg), checked.task, fitted.model, data)
    seconds = round(time.perf_counter() - started, 3)
    metrics = {**fitted.val_metrics, **shipped.metrics}
    per_model = {trained: examples}
    if checked.recipe is None:
        metrics.update(tested)
    else:  # test/* is the shipped model's alone: absent where none was shipped
        metrics.update(_suffixed(tested, trained))
    if shipped.quantized is not None and checked.recipe is not None:
        on_target = _trainer_on(checked.recipe.target().torch_device, cfg)
        quantized, per_model[QUANTIZED] = _test(on_target, checked.task, shipped.quantized, data)
        metrics.update(_quantized_metrics(quantized, metrics, checked.task.headline))
    timing = _job_timing(cfg, checked, data, shipped, job)
    backends = [backend.job_models(timing) for backend in checked.backends.values()]
    for backend in backends:
        for key, suffix in backend.tested.items():
            other, per_model[suffix] = _test(
                _trainer_on(_CPU, cfg), checked.task, backend.timed[key].model, data
            )
            metrics.update(_suffixed(other, suffix))
    return Evaluated(metrics, backends, seconds, per_model)


def _test(
    trainer: L.Trainer, task: Task, model: nn.Module, data: Data
) -> tuple[dict[str, float], dict[str, Any]]:
    """The test metrics of `model`, and its per-example results (the task's columns)."""
    module = task.lightning_module(model, data.module)
    tested = trainer.test(module, datamodule=data.module, verbose=False)
    return {k: float(v) for k, v in tested[0].items()}, module.test_examples


def _quantized_metrics(tested: dict[str, float], before: dict[str, float], headline: str) -> dict[str, float]:
    """The quantized model is what ships: its figures are test/*, also kept as test/*_quantized,
    with the delta of the headline figure to the float model's (PTQ; QAT has no float test of its own)."""
    metrics = {**tested, **_suffixed(tested, QUANTIZED)}
    if f"{headline}_{FLOAT}" in before:
        metrics[f"{headline}_delta"] = tested[headline] - before[f"{headline}_{FLOAT}"]
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
    return L.Trainer(
        **single, logger=False, default_root_dir=trainer.default_root_dir, plugins=slurm.lightning_plugins()
    )


_CPU = torch.device("cpu")


def _trainer_on(device: torch.device, cfg: Config) -> L.Trainer:
    """A one-device tester on `device`; the test batches are the fit's (`trainer.limit_test_batches`),
    so every model of a job is scored on the same examples."""
    return tester(device, cfg.trainer.limit_test_batches)


def _job_timing(cfg: Config, checked: Checked, data: Data, shipped: Shipped, job: JobContext) -> JobTiming:
    precision = str(cfg.trainer.precision)
    autocast = getattr(torch, PRECISIONS[precision]) if precision.endswith("-mixed") else None
    return JobTiming(
        shipped=shipped,
        device=checked.device,
        precision=precision,
        autocast=autocast,
        folder=job.folder,
        example=checked.task.example_inputs(data.module),
        max_len=max_positions(shipped.float_model.config),
        threads=cfg.benchmark.threads or torch.get_num_threads(),
    )


def time_models(
    cfg: Config, checked: Checked, data: Data, built: Built, shipped: Shipped, evaluated: Evaluated
) -> list[dict[str, Any]]:
    """Every backend's models timed side by side in rounds; one latency row each. A forward runs
    inside the task's LightningModule (the forward testing ran); a generation
    (`benchmark.new_tokens` > 0) calls the model itself, which takes the KV cache. Both under any
    forced SDPA kernel; the timing places each model on its contender's device (testing left it
    wherever Lightning's teardown put it)."""
    generating = cfg.benchmark.new_tokens > 0
    timed = {
        key: c if generating else replace(c, model=checked.task.lightning_module(c.model, data.module))
        for backend in evaluated.backends
        for key, c in backend.timed.items()
    }
    torch_run = {backend.name for backend in checked.backends.values() if backend.runs_torch}
    with forced_kernel(cfg.attention.sdpa_backend if generating else None):
        return latency_rows(cfg, checked.task, timed, built.hf_config, torch_run)


def latency_rows(
    cfg: Config,
    task: Task,
    timed_models: dict[tuple[str, str], Contender],
    hf_config: PretrainedConfig,
    torch_run: set[str],
) -> list[dict[str, Any]]:
    """One latency record per (variant, backend): what was timed, how, under which host load, the
    figures, and its ratio to the float row timed under the same conditions, paired round by round
    (the figure a quantized-vs-float decision reads; `qatflash.timing.pairing`). A generation's row holds
    decode per token as its own figures and ratios, prefill's under `prefill_`, compiled decode's
    under `compiled_`, and each against its device's ceilings (`qatflash.timing.roofline`). A row of
    a backend in `torch_run` (one whose model torch runs) names its attention kernel and throughput
    (`qatflash.timing.attention_profile`)."""
    vocab_size = hf_config.vocab_size
    seq_len = cfg.benchmark.seq_len or cfg.data.max_length
    threads = cfg.benchmark.threads or torch.get_num_threads()
    conditions = {key: Conditions(c.device.type, key[1], threads, c.dtype) for key, c in timed_models.items()}
    inputs = task.timing_inputs(cfg.benchmark.batch_size, seq_len, vocab_size)
    profiled = {key: c for key, c in timed_models.items() if key[1] in torch_run}
    ceilings = device_ceilings(timed_models)
    if cfg.benchmark.new_tokens > 0:
        prompt = inputs["input_ids"]
        generations = generation_rounds(timed_models, cfg.benchmark, prompt)
        timed = {key: g.decode for key, g in generations.items()}
        figures = {key: generation_figures(g) for key, g in generations.items()}
        structure = model_on_meta(hf_config, task.auto_model)
        add_roofline(
            figures, timed_models, ceilings, structure, hf_config, prompt.shape, cfg.benchmark.new_tokens
        )
        phases = {"prefill": {key: g.prefill for key, g in generations.items()}}
        if cfg.benchmark.decode == "compiled":
            phases["compiled"] = {key: g.compiled.decode for key, g in generations.items() if g.compiled}
        extra = {key: {} for key in timed}
        for phase, sides in phases.items():
            for key, ratios in paired_ratios(sides, conditions).items():
                extra[key].update({f"{phase}_{k}": v for k, v in ratios.items()})
    else:
        timed = measure_side_by_side(timed_models, cfg.benchmark, seq_len, vocab_size, task.timing_inputs)
        figures = {key: {**t.stats.as_dict(), "scenario": "forward"} for key, t in timed.items()}
        extra = {key: {} for key in timed}
    add_attention(figures, profiled, ceilings, hf_config, inputs, task.attends_causally, cfg.benchmark)
    ratios = paired_ratios(timed, conditions)
    return [
        {
            "variant": variant,
            "precision": timed_models[variant, backend].precision,
            "backend": backend,
            "device": conditions[variant, backend].device,
            "dtype": conditions[variant, backend].dtype,
            "threads": threads,
            "seq_len": seq_len,
            "batch_size": cfg.benchmark.batch_size,
            "timer": "cuda_event" if conditions[variant, backend].device == "cuda" else "perf_counter",
            **figures[variant, backend],
            **result.host.as_dict(),
            **ratios[variant, backend],
            **extra[variant, backend],
        }
        for (variant, backend), result in timed.items()
    ]


def record_results(
    record: RunRecord,
    task: Task,
    data: Data,
    built: Built,
    fitted: Fitted,
    shipped: Shipped,
    evaluated: Evaluated,
    latency: list[dict[str, Any]],
    bench_s: float | None,
) -> None:
    """What each stage measured, into results.json's sections (written `ok` when the job ends)."""
    record.update("params", {"optimizer_steps": data.plan.steps, **fitted.record["params"]})
    record.update("model", {"parameters": sum(p.numel() for p in built.model.parameters())})
    record.update(
        "model", {"num_labels": built.hf_config.num_labels, **fitted.record["model"], **shipped.record}
    )
    record.update("model", task.model_facts(built.hf_config, shipped.recipe))
    if "not_shipped" in shipped.record:
        record.data["warnings"].append(f"not shipped: {shipped.record['not_shipped']}")
    for backend in evaluated.backends:
        record.update("model", backend.record)
        record.data["warnings"].extend(backend.warnings)
    record.data["resumed_from"] = fitted.record["resumed_from"]
    record.data["task"] = task.describe()
    record.update("metrics", {**evaluated.metrics, **task.baseline_metrics(data.module)})
    record.data["examples"] = record.save_examples(evaluated.examples)
    record.update("latency", latency)
    bench = {"bench_s": bench_s} if bench_s is not None else {}
    record.update(
        "timing", {"fit_s": fitted.seconds, **fitted.record["timing"], "test_s": evaluated.seconds, **bench}
    )
