"""Structured configs: the schema of every config group, checked before any work starts.

Hydra checks types when it composes `conf/` against these dataclasses; `__post_init__` checks
ranges and combinations when `to_config` turns the composed DictConfig into objects. Checks that
need the device or a loaded model (attention kernels, position limits) live with the code that
knows those facts (`attention.py`, `models.py`) and also run before training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """Bad input: a one-line message naming the value, why it is refused and what is allowed."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    _require(value in allowed, f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"model.optim.lr={self.lr} must be > 0")
        _require(self.weight_decay >= 0, f"model.optim.weight_decay={self.weight_decay} must be >= 0")
        _require(
            0 <= self.warmup_ratio < 1, f"model.optim.warmup_ratio={self.warmup_ratio} must be in [0, 1)"
        )


@dataclass
class ModelConfig:
    # A hub id, a local folder, or pkg://<python package>/<folder inside it>. When set, weights and
    # tokenizer are loaded from there and `arch` is ignored.
    name_or_path: str | None = None
    # Hugging Face config fields (with `model_type`) for a randomly initialised model. Its tokenizer
    # is a WordPiece vocabulary trained on the training split, so no download is ever needed.
    arch: dict[str, Any] | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        _require(
            self.name_or_path is not None or self.arch is not None,
            "model needs model.name_or_path (pretrained) or model.arch (built from a config); both are null",
        )
        if self.name_or_path is None and self.arch is not None:
            _require("model_type" in self.arch, "model.arch needs a model_type (e.g. bert, llama)")


@dataclass
class SyntheticConfig:
    """A seeded sentiment-counting task whose evidence is spread along the whole sentence."""

    num_train: int = 4000
    num_validation: int = 500
    num_test: int = 1000
    words: int = 60
    evidence: int = 9
    fillers: int = 300

    def __post_init__(self) -> None:
        for name in ("num_train", "num_validation", "num_test", "fillers"):
            _require(getattr(self, name) > 0, f"data.synthetic.{name}={getattr(self, name)} must be > 0")
        _require(
            self.evidence > 0 and self.evidence % 2 == 1,
            f"data.synthetic.evidence={self.evidence} must be a positive odd number (no ties)",
        )
        _require(
            self.words >= self.evidence,
            f"data.synthetic.words={self.words} must be >= data.synthetic.evidence={self.evidence}",
        )


EVAL_PADDING = ("longest", "max_length")


@dataclass
class DataConfig:
    # Where the splits come from, first match wins: a local folder of split files, a hub dataset,
    # or the synthetic task.
    path: str | None = None
    hub_id: str | None = None
    hub_name: str | None = None
    # Our split name -> hub split spec (slicing allowed, e.g. "train[:90%]"). Local folders hold one
    # file per split, named train.*, validation.*, test.* (tsv, csv, json, jsonl or parquet).
    hub_splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"}
    )
    synthetic: SyntheticConfig | None = None
    text_column: str = "sentence"
    label_column: str = "label"
    # For files without a header row: the column names, in order.
    header: bool = True
    column_names: list[str] | None = None
    # Inferred from the training labels when null; when set, the labels must fit it.
    num_labels: int | None = None
    max_length: int = 128
    batch_size: int = 32
    eval_batch_size: int = 128
    # Training always pads to the longest sequence of the batch; evaluation may use a fixed shape.
    eval_padding: str = "longest"
    # Batch training sentences of similar length (transformers' LengthGroupedSampler): less padding.
    group_by_length: bool = False
    train_subset: int | None = None
    validation_subset: int | None = None
    num_workers: int = 0
    # HF datasets cache (tokenized splits are reused across runs); null = the HF default.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _require(
            self.path is not None or self.hub_id is not None or self.synthetic is not None,
            "data needs data.path (local folder), data.hub_id (hub dataset) or data.synthetic; all are null",
        )
        _require(self.max_length > 0, f"data.max_length={self.max_length} must be > 0")
        _require(self.batch_size > 0, f"data.batch_size={self.batch_size} must be > 0")
        _require(self.eval_batch_size > 0, f"data.eval_batch_size={self.eval_batch_size} must be > 0")
        _one_of("data.eval_padding", self.eval_padding, EVAL_PADDING)
        _require(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
        for name in ("train_subset", "validation_subset"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"data.{name}={value} must be > 0 or null")
        _require(
            self.num_labels is None or self.num_labels >= 2,
            f"data.num_labels={self.num_labels} must be >= 2 or null (inferred)",
        )
        _require(
            self.header or bool(self.column_names),
            "data.header=false needs data.column_names (the columns of the files, in order)",
        )


SDPA_BACKENDS = ("flash", "efficient", "math", "cudnn")


@dataclass
class AttentionConfig:
    # Passed to transformers as attn_implementation; what it needs is data, so a new implementation
    # is a new YAML file.
    implementation: str = "sdpa"
    # Force one SDPA kernel around every forward (torch.nn.attention.sdpa_kernel); null = PyTorch picks.
    sdpa_backend: str | None = None
    requires_cuda: bool = False
    requires_half_precision: bool = False
    # An importable module the implementation needs, and how to get it.
    requires_module: str | None = None
    install_hint: str | None = None

    def __post_init__(self) -> None:
        if self.sdpa_backend is not None:
            _one_of("attention.sdpa_backend", self.sdpa_backend, (None, *SDPA_BACKENDS))
            _require(
                self.implementation == "sdpa",
                f"attention.sdpa_backend={self.sdpa_backend} forces an SDPA kernel, but "
                f"attention={self.implementation} does not use SDPA; use attention=sdpa",
            )


QUANT_METHODS = ("none", "ptq_dynamic", "ptq_static", "qat")
OBSERVERS = (
    "minmax",
    "moving_average_minmax",
    "per_channel_minmax",
    "moving_average_per_channel_minmax",
    "histogram",
)
QSCHEMES = ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric")


@dataclass
class ObserverConfig:
    """How one tensor kind (activations or weights) is observed and quantized (torch.ao terms)."""

    observer: str = "moving_average_minmax"
    dtype: str = "quint8"
    qscheme: str = "per_tensor_affine"
    quant_min: int = 0
    quant_max: int = 255
    reduce_range: bool = False

    def __post_init__(self) -> None:
        _one_of("quant observer", self.observer, OBSERVERS)
        _one_of("quant dtype", self.dtype, ("quint8", "qint8"))
        _one_of("quant qscheme", self.qscheme, QSCHEMES)
        _require(
            self.quant_min < self.quant_max,
            f"quant range [{self.quant_min}, {self.quant_max}] is empty; quant_min must be < quant_max",
        )
        per_channel = self.qscheme.startswith("per_channel")
        _require(
            per_channel == ("per_channel" in self.observer),
            f"quant qscheme={self.qscheme} needs a{' per-channel' if per_channel else ' per-tensor'} observer, "
            f"not observer={self.observer}",
        )


@dataclass
class TargetsConfig:
    """Which nn.Linear modules are quantized: glob patterns over module names (fnmatch)."""

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    # Also leave out the first and the last transformer block (numbered `layer.N` / `layers.N`).
    skip_edge_blocks: bool = False


INT_DTYPES = tuple(f"int{bits}" for bits in range(2, 9))


@dataclass
class TorchaoConfig:
    """torchao fake quantization: int8 per-token asymmetric activations, intN symmetric weights."""

    weight_dtype: str = "int8"
    # Weight scales per group of this many input channels; null = one per output channel.
    group_size: int | None = None

    def __post_init__(self) -> None:
        _one_of("quant.torchao.weight_dtype", self.weight_dtype, INT_DTYPES)
        _require(
            self.group_size is None or self.group_size > 0,
            f"quant.torchao.group_size={self.group_size} must be > 0 or null (per channel)",
        )


# Which methods each API implements here.
QUANT_APIS = {
    "eager": ("ptq_dynamic", "ptq_static", "qat"),
    "torchao": ("ptq_dynamic", "qat"),
    "pt2e": ("ptq_static", "qat"),
}
# The quantized engines whose packed Linear weights have fbgemm's float-output INT8 kernel.
FLOAT_OUTPUT_ENGINES = ("x86", "fbgemm")


@dataclass
class QuantConfig:
    method: str = "none"
    # eager: torch.ao eager mode; torchao: quantize_ with QATConfig; pt2e: torch.export + X86InductorQuantizer.
    api: str = "eager"
    # torch.backends.quantized.engine for conversion and INT8 inference (eager).
    engine: str = "x86"
    activation: ObserverConfig | None = None
    weight: ObserverConfig | None = None
    torchao: TorchaoConfig | None = None
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    # int8: embedding tables quantized weight-only (per-row), about half of a BERT's bytes.
    embeddings: str = "float"
    # ptq_static: training batches that calibrate the observers.
    calibration_batches: int = 32
    # qat: train in float for this many steps before fake quantization starts ...
    fake_quant_start_step: int = 0
    # ... and stop updating observers (scales, zero points) from this step on; null = never.
    freeze_observers_step: int | None = None
    # qat (eager api, attention=eager): also fake-quantize the inputs of QKᵀ and probabilities·V.
    attention_matmuls: bool = False
    # eager ptq_static/qat: `quantized` = each INT8 Linear rounds its output to uint8 (torch.ao's
    # default), which the next float op dequantizes; `float` = the int8 GEMM writes float output in
    # the same kernel (fbgemm), and QAT trains without fake quantization on Linear outputs.
    linear_output: str = "quantized"

    def __post_init__(self) -> None:
        _one_of("quant.method", self.method, QUANT_METHODS)
        _one_of("quant.api", self.api, tuple(QUANT_APIS))
        _one_of("quant.engine", self.engine, ("x86", "fbgemm", "qnnpack", "onednn"))
        _one_of("quant.embeddings", self.embeddings, ("float", "int8"))
        _one_of("quant.linear_output", self.linear_output, ("quantized", "float"))
        if self.method != "none":
            self._check_api()
        _require(
            self.calibration_batches > 0, f"quant.calibration_batches={self.calibration_batches} must be > 0"
        )
        _require(
            self.fake_quant_start_step >= 0,
            f"quant.fake_quant_start_step={self.fake_quant_start_step} must be >= 0",
        )
        _require(
            self.freeze_observers_step is None or self.freeze_observers_step > self.fake_quant_start_step,
            f"quant.freeze_observers_step={self.freeze_observers_step} must come after "
            f"quant.fake_quant_start_step={self.fake_quant_start_step}",
        )
        _require(bool(self.targets.include), "quant.targets.include is empty; use ['*'] for every Linear")

    def _check_api(self) -> None:
        _require(
            self.method in QUANT_APIS[self.api],
            f"quant.method={self.method} is not available with quant.api={self.api}; "
            f"it offers {list(QUANT_APIS[self.api])}",
        )
        if self.api == "eager":
            needs = ("weight",) if self.method == "ptq_dynamic" else ("activation", "weight")
            missing = [f"quant.{name}" for name in needs if getattr(self, name) is None]
            _require(not missing, f"quant.method={self.method} (api=eager) needs observers: {missing}")
        if self.attention_matmuls:
            _require(
                self.api == "eager" and self.method == "qat",
                f"quant.attention_matmuls=true needs quant.api=eager and quant.method=qat, not "
                f"api={self.api} method={self.method}",
            )
        if self.linear_output == "float":
            _require(
                self.api == "eager" and self.method in ("ptq_static", "qat"),
                f"quant.linear_output=float needs quant.api=eager with method ptq_static or qat, not "
                f"api={self.api} method={self.method} (ptq_dynamic's INT8 Linears already return float)",
            )
            _require(
                self.engine in FLOAT_OUTPUT_ENGINES,
                f"quant.linear_output=float needs quant.engine in {list(FLOAT_OUTPUT_ENGINES)} (fbgemm's "
                f"float-output kernel), not {self.engine}",
            )
        if self.api == "torchao":
            _require(self.torchao is not None, "quant.api=torchao needs a quant.torchao section")
            _require(
                self.freeze_observers_step is None,
                f"quant.freeze_observers_step={self.freeze_observers_step}: torchao fake quantization "
                "computes its scales every step and has no observers to freeze; use null",
            )
        if self.api == "pt2e":
            _require(
                self.engine == "x86", f"quant.engine={self.engine}: quant.api=pt2e targets x86 (Inductor)"
            )
            _require(
                self.embeddings == "float",
                "quant.embeddings=int8: the x86 Inductor quantizer (quant.api=pt2e) keeps embeddings float",
            )


PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


@dataclass
class TrainerConfig:
    """The subset of lightning.Trainer arguments a sweep needs; passed through as keyword arguments."""

    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    max_epochs: int = 3
    max_steps: int = -1
    # Lightning's meaning: an int is a number of batches, a float in [0, 1] a fraction of them (typed
    # Any because OmegaConf cannot merge an int | float union; checked in __post_init__).
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    val_check_interval: Any = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 20
    deterministic: bool = False
    enable_progress_bar: bool = False
    enable_model_summary: bool = False
    num_sanity_val_steps: int = 0

    def __post_init__(self) -> None:
        _one_of("trainer.precision", str(self.precision), PRECISIONS)
        _one_of("trainer.accelerator", self.accelerator, ("auto", "cpu", "gpu", "cuda", "mps"))
        _require(
            self.max_epochs > 0 or self.max_steps > 0,
            f"trainer.max_epochs={self.max_epochs} and trainer.max_steps={self.max_steps}: one must be > 0",
        )
        for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "val_check_interval"):
            value = getattr(self, name)
            batches = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            fraction = isinstance(value, float) and 0 <= value <= 1
            _require(
                value is None or batches or fraction,
                f"trainer.{name}={value!r} must be an int (batches), a float in [0, 1] (a fraction) or null",
            )


@dataclass
class LoggerConfig:
    kind: str = "wandb"
    project: str = "qatflash"
    entity: str | None = None
    # offline needs no account; `wandb sync <run dir>` uploads later.
    mode: str = "offline"
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _one_of("logger.kind", self.kind, ("wandb", "csv", "none"))
        _one_of("logger.mode", self.mode, ("offline", "online", "disabled"))


BENCH_BACKENDS = ("torch", "torch_compile", "onnxruntime")


@dataclass
class BenchmarkConfig:
    enabled: bool = True
    batch_size: int = 1
    # Sequence length of the timed inputs; null = data.max_length.
    seq_len: int | None = None
    warmup: int = 5
    min_iters: int = 20
    min_duration_s: float = 1.0
    # Forwards per model per round when a job times several models (FP32, INT8, ...) side by side.
    block_iters: int = 5
    # CPU threads during timing; null = leave torch's setting and record it.
    threads: int | None = None
    # What runs the timed forwards: torch (eager), torch_compile, onnxruntime (optional extra).
    backends: list[str] = field(default_factory=lambda: ["torch"])

    def __post_init__(self) -> None:
        _require(bool(self.backends), "benchmark.backends is empty; allowed: " + ", ".join(BENCH_BACKENDS))
        for backend in self.backends:
            _one_of("benchmark.backends entry", backend, BENCH_BACKENDS)
        _require(
            len(set(self.backends)) == len(self.backends),
            f"benchmark.backends={list(self.backends)} repeats a backend",
        )
        _require(self.batch_size > 0, f"benchmark.batch_size={self.batch_size} must be > 0")
        _require(self.seq_len is None or self.seq_len > 0, f"benchmark.seq_len={self.seq_len} must be > 0")
        _require(self.warmup >= 0, f"benchmark.warmup={self.warmup} must be >= 0")
        _require(self.min_iters > 0, f"benchmark.min_iters={self.min_iters} must be > 0")
        _require(self.min_duration_s >= 0, f"benchmark.min_duration_s={self.min_duration_s} must be >= 0")
        _require(self.block_iters > 0, f"benchmark.block_iters={self.block_iters} must be > 0")
        _require(self.threads is None or self.threads > 0, f"benchmark.threads={self.threads} must be > 0")


BENCH_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BenchSweepConfig:
    """What `qatflash-bench` times: every (seq_len, batch_size) of one model and attention, per `benchmark.backends`."""

    seq_lens: list[int] = field(default_factory=lambda: [128])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    device: str = "cpu"
    dtype: str = "float32"
    # Each point in a fresh spawned process, so its memory and latency owe nothing to earlier points.
    isolate: bool = True
    # Cap each point's memory (CPU: address space above the loaded model; CUDA: allocator fraction);
    # a point over the cap is recorded as `failed: out of memory`. null = no cap.
    max_memory_gb: float | None = None
    # A training run's folder: time its INT8 artifact instead of building `model` (CPU, float32).
    artifact: str | None = None

    def __post_init__(self) -> None:
        for name in ("seq_lens", "batch_sizes"):
            _require(bool(getattr(self, name)), f"bench.{name} is empty")
        for name in ("seq_lens", "batch_sizes"):
            bad = [v for v in getattr(self, name) if v <= 0]
            _require(not bad, f"bench.{name} holds {bad}; every value must be > 0")
        _one_of("bench.device", self.device, ("cpu", "cuda"))
        _one_of("bench.dtype", self.dtype, BENCH_DTYPES)
        _require(
            self.max_memory_gb is None or self.max_memory_gb > 0,
            f"bench.max_memory_gb={self.max_memory_gb} must be > 0 or null",
        )


@dataclass
class SharedRoot:
    """The groups both apps read: a model, its attention, timing settings and experiment tracking."""

    model: ModelConfig = MISSING
    attention: AttentionConfig = MISSING
    benchmark: BenchmarkConfig = MISSING
    logger: LoggerConfig = MISSING
    experiment_name: str = "default"
    # A sweep's folder under multirun/<experiment_name>/: the same command lands in the same folders,
    # so running it again resumes it (points whose results.json is ok are skipped unless force=true).
    sweep_name: str = "default"
    force: bool = False
    seed: int = 0


@dataclass
class Config(SharedRoot):
    """The root of `qatflash`: every group is filled by a YAML file of its `conf/` folder (no defaults here)."""

    data: DataConfig = MISSING
    quant: QuantConfig = MISSING
    trainer: TrainerConfig = MISSING
    # FP32 and PTQ points of a sweep share one FP32 fine-tune (qatflash.finetune_cache); false: each trains.
    reuse_fp32: bool = True
    # Epoch-end checkpoints in <run>/checkpoints/ let a killed or failed job resume; kept after an ok run only if true.
    keep_checkpoints: bool = False
    # What the job returns to a sweeper that optimises (hydra/sweeper=optuna): metrics or summary keys,
    # e.g. [test/acc] or [test/acc, latency/int8/torch/p50_ms] with directions [maximize, minimize].
    objective: list[str] = field(default_factory=lambda: ["test/acc"])

    def __post_init__(self) -> None:
        _require(
            not self.quant.attention_matmuls or self.attention.implementation == "eager",
            f"quant.attention_matmuls=true fake-quantizes eager attention's matmuls, but "
            f"attention={self.attention.implementation} runs a fused kernel; use attention=eager",
        )
        spawned = self.trainer.strategy.startswith("ddp_spawn")
        _require(
            not (spawned and self.quant.api == "pt2e" and self.quant.method != "none"),
            f"trainer.strategy={self.trainer.strategy} sends the model to its workers by pickle, which "
            f"quant.api=pt2e's exported graphs do not support; use quant.api=eager or torchao, or one device",
        )


@dataclass
class BenchAppConfig(SharedRoot):
    """The root of `qatflash-bench`: the shared groups and the sweep of points, no training."""

    bench: BenchSweepConfig = field(default_factory=BenchSweepConfig)


def register_schema() -> None:
    """The schemas that `conf/config.yaml` (`schema`) and `conf/bench.yaml` (`bench_schema`) compose onto."""
    ConfigStore.instance().store(name="schema", node=Config)
    ConfigStore.instance().store(name="bench_schema", node=BenchAppConfig)
    OmegaConf.register_new_resolver("point_dir", point_dir, replace=True)


# Most file systems refuse names longer than 255 bytes; keep well below, with room for a digest.
_MAX_POINT_DIR = 200


def point_dir(overrides: str) -> str:
    """A sweep point's folder name: its overrides, readable and the same for the same command.

    A point with no overrides gets `base`; one whose overrides would exceed a file name's limit
    keeps their readable start and a digest of all of them, so distinct points never collide.
    """
    if not overrides:
        return "base"
    if len(overrides.encode()) <= _MAX_POINT_DIR:
        return overrides
    digest = hashlib.sha256(overrides.encode()).hexdigest()[:12]
    return f"{overrides.encode()[: _MAX_POINT_DIR - 13].decode(errors='ignore')}-{digest}"


def to_config(cfg: DictConfig) -> Any:
    """Resolve interpolations and build the dataclasses (Config or BenchAppConfig), which runs every
    `__post_init__` check."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
