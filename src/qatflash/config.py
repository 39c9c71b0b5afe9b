"""Structured configs: the schema of every config group, checked before any work starts.

Hydra checks types when it composes `conf/` against these dataclasses; `__post_init__` checks
ranges and combinations when `to_config` turns the composed DictConfig into objects. What a
quantization API, timing backend or task accepts is checked by its registered class (looked up
by name, imported only then); checks that need the device or a loaded model (attention kernels,
position limits) live with the code that knows those facts (`attention.py`, `models.py`) and run
before the first batch too. Each vocabulary (precisions, dtypes, kernel names, observers) is
defined here once, by name, and the runtime maps torch objects onto these names. This module
imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from qatflash.errors import one_of as _one_of
from qatflash.errors import require as _require
from qatflash.quant import RECIPES
from qatflash.tasks import TASKS
from qatflash.timing import TIMING_BACKENDS


def _positive_or_null(name: str, value: float | None, null_means: str = "") -> None:
    _require(value is None or value > 0, f"{name}={value} must be > 0 or null{null_means}")


def _check_step(name: str, value: Any) -> None:
    """A schedule point: an optimizer step (int >= 0) or a fraction of the fit's steps (float in [0, 1))."""
    step = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    fraction = isinstance(value, float) and 0 <= value < 1
    _require(
        step or fraction,
        f"{name}={value!r} must be a step (int >= 0) or a fraction of the fit's steps (float in [0, 1))",
    )


# Lightning's precisions, each with the dtype it computes in (autocast for the -mixed ones).
PRECISIONS = {
    "32-true": "float32",
    "32": "float32",
    "bf16-mixed": "bfloat16",
    "16-mixed": "float16",
    "bf16-true": "bfloat16",
    "16-true": "float16",
}
HALF_PRECISIONS = tuple(p for p, dtype in PRECISIONS.items() if dtype != "float32")
# The dtypes a benchmark runs a model in, and the precision each stands for in attention's checks.
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_PRECISIONS = {"float32": "32-true", "bfloat16": "bf16-true", "float16": "16-true"}
# SDPA kernels a run may force, by name, with the member of torch.nn.attention.SDPBackend each is.
SDPA_KERNELS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
    "cudnn": "CUDNN_ATTENTION",
}


# The splits every data source gives, by these names.
SPLITS = ("train", "validation", "test")


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
    # Which task's data this is (qatflash.tasks): a task refuses another's.
    kind: str = "classification"
    hub_name: str | None = None
    # Our split name -> hub split spec (slicing allowed, e.g. "train[:90%]"). Local folders hold one
    # file per split, named train.*, validation.*, test.* (tsv, csv, json, jsonl or parquet; causal_lm
    # also txt), unless `files` names them.
    hub_splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"}
    )
    # causal_lm: split -> file inside `path` (e.g. {train: valid.txt, test: test.txt}); a split left
    # null is found by its name (validation also as valid, val or dev). `path` may also be one file,
    # which is then the training text. The three keys are declared so that the command line can
    # set them (data.files.validation=valid.txt, or data.files={...}) without Hydra's `+`.
    files: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(SPLITS))
    # causal_lm: splits carved from the end of the training text, as fractions of its lines
    # (e.g. {validation: 0.1}): a split named here must not come from a file too.
    holdout: dict[str, float] = field(default_factory=dict)
    # causal_lm evaluation: windows of eval_length tokens (null = max_length) that score every token of
    # the split exactly once; eval_stride < eval_length slides them by that many tokens instead, each
    # scoring only its new tokens with the rest as context (null = non-overlapping).
    eval_length: int | None = None
    eval_stride: int | None = None
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
            _positive_or_null(f"data.{name}", getattr(self, name))
        _require(
            self.num_labels is None or self.num_labels >= 2,
            f"data.num_labels={self.num_labels} must be >= 2 or null (inferred)",
        )
        for split, fraction in self.holdout.items():
            _one_of("data.holdout split", split, ("validation", "test"))
            _require(0 < fraction < 1, f"data.holdout.{split}={fraction} must be in (0, 1)")
        _require(sum(self.holdout.values()) < 1, f"data.holdout={dict(self.holdout)} leaves no training text")
        for split in self.files:
            _one_of("data.files split", split, SPLITS)
        clash = sorted(set(self.holdout) & {split for split, name in self.files.items() if name})
        _require(not clash, f"data.holdout and data.files both give the split(s) {clash}; choose one")
        _positive_or_null("data.eval_length", self.eval_length)
        _positive_or_null("data.eval_stride", self.eval_stride)
        evaluated = self.eval_length or self.max_length
        _require(
            self.eval_stride is None or self.eval_stride < evaluated,
            f"data.eval_stride={self.eval_stride} must be < the evaluation length {evaluated} "
            "(null: non-overlapping windows)",
        )
        _require(
            self.header or bool(self.column_names),
            "data.header=false needs data.column_names (the columns of the files, in order)",
        )


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
            _one_of("attention.sdpa_backend", self.sdpa_backend, (None, *SDPA_KERNELS))
            _require(
                self.implementation == "sdpa",
                f"attention.sdpa_backend={self.sdpa_backend} forces an SDPA kernel, but "
                f"attention={self.implementation} does not use SDPA; use attention=sdpa",
            )


# ptq_weight_only: weights stored in int8/int4/nf4, activations stay float (the LLM decode baselines).
QUANT_METHODS = ("none", "ptq_dynamic", "ptq_static", "ptq_weight_only", "qat")
# torch.backends.quantized engines a recipe may convert for.
QUANT_ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")
# torch.ao observers by name, with the class of torch.ao.quantization each is.
OBSERVERS = {
    "minmax": "MinMaxObserver",
    "moving_average_minmax": "MovingAverageMinMaxObserver",
    "per_channel_minmax": "PerChannelMinMaxObserver",
    "moving_average_per_channel_minmax": "MovingAveragePerChannelMinMaxObserver",
    "histogram": "HistogramObserver",
}
# Quantized dtypes and qschemes: the names of torch's own attributes.
QUANT_DTYPES = ("quint8", "qint8")
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
        _one_of("quant observer", self.observer, tuple(OBSERVERS))
        _one_of("quant dtype", self.dtype, QUANT_DTYPES)
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
    """Which weight-matrix modules are quantized: glob patterns over module names (fnmatch)."""

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    # Also leave out the first and the last transformer block (numbered `layer.N`, `layers.N` or `h.N`).
    skip_edge_blocks: bool = False


INT_DTYPES = tuple(f"int{bits}" for bits in range(2, 9))
# What a torchao recipe's weights may be stored as: integers (uint4 is tinygemm's int4), FP8 and FP4.
TORCHAO_WEIGHT_DTYPES = (*INT_DTYPES, "uint4", "float8_e4m3fn", "float8_e5m2", "float4_e2m1fn_x2")


@dataclass
class TorchaoConfig:
    """torchao's own config classes, named from YAML (`_target_` and keyword arguments): what QAT
    fake-quantizes (`activation`, `weight`) and what `quantize_` converts to (`convert`). The two
    knobs below are what the recipes' YAML interpolates, so `quant.torchao.group_size=64` still
    regroups a recipe's weights; dtype, granularity and mapping names are resolved in one place
    (`qatflash.quant.torchao_recipe.resolve`). QAT without `weight` derives its fake quantization
    from `convert` (torchao's QATConfig(base_config))."""

    weight_dtype: str = "int8"
    # Weight scales per group of this many input channels; null = one per output channel.
    group_size: int | None = None
    activation: dict[str, Any] | None = None
    weight: dict[str, Any] | None = None
    convert: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _one_of("quant.torchao.weight_dtype", self.weight_dtype, TORCHAO_WEIGHT_DTYPES)
        _positive_or_null("quant.torchao.group_size", self.group_size, " (per channel)")


# Weight-only storage formats: int8 per output channel, int4 in groups of input channels, NF4
# (bitsandbytes' 4-bit NormalFloat, in blocks).
WEIGHT_ONLY_DTYPES = ("int8", "int4", "nf4")


@dataclass
class WeightOnlyConfig:
    """What a weight-only recipe (quant.api=packed or bitsandbytes) stores its Linear weights as."""

    weight_dtype: str = "int8"
    # int4/nf4: one scale per group (block) of this many input channels; int8 has one per output channel.
    group_size: int | None = None
    # bitsandbytes int8 (LLM.int8): inputs with a feature above this magnitude run that feature in
    # float (0 = pure int8).
    outlier_threshold: float = 6.0

    def __post_init__(self) -> None:
        _one_of("quant.weight_only.weight_dtype", self.weight_dtype, WEIGHT_ONLY_DTYPES)
        _require(
            (self.weight_dtype == "int8") == (self.group_size is None),
            f"quant.weight_only.group_size={self.group_size} with weight_dtype={self.weight_dtype}: "
            "int4 and nf4 need a group size (e.g. 32, 64), int8 takes null (per output channel)",
        )
        _positive_or_null("quant.weight_only.group_size", self.group_size)
        _require(
            self.outlier_threshold >= 0,
            f"quant.weight_only.outlier_threshold={self.outlier_threshold} must be >= 0",
        )


@dataclass
class DistillConfig:
    """Quantization-aware distillation (`qatflash.distill`): QAT's loss becomes alpha x the task's
    loss + (1 - alpha) x temperature^2 x KL(teacher || student) at that temperature."""

    alpha: float = 0.5
    temperature: float = 2.0
    # null: the sweep's shared FP32 fine-tune (its quant=fp32 point runs first); else a folder: a
    # shared fine-tune's (<sweep>/.fp32_models/<key>) or a Hugging Face model's
    teacher: str | None = None

    def __post_init__(self) -> None:
        _require(
            0 <= self.alpha < 1,
            f"quant.distill.alpha={self.alpha} must be in [0, 1) (1 leaves the teacher out: use quant.distill=null)",
        )
        _require(self.temperature > 0, f"quant.distill.temperature={self.temperature} must be > 0")


@dataclass
class LoraConfig:
    """QAT with LoRA (`qatflash.quant.lora`): rank-`r` adapters beside each quantized Linear, their
    product scaled by alpha / r, on a frozen fake-quantized base; merged into it before conversion."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # The rate of what trains (the adapters and the float head); null = model.optim.lr. Adapters are
    # a few hundred thousand parameters starting from B = 0 and usually train at about ten times a
    # full fine-tune's rate (LoRA's paper: 5e-4 for RoBERTa-base on SST-2).
    lr: float | None = None

    def __post_init__(self) -> None:
        _require(self.r > 0, f"quant.lora.r={self.r} must be > 0")
        _require(self.alpha > 0, f"quant.lora.alpha={self.alpha} must be > 0")
        _require(0 <= self.dropout < 1, f"quant.lora.dropout={self.dropout} must be in [0, 1)")
        _require(self.lr is None or self.lr > 0, f"quant.lora.lr={self.lr} must be > 0 (or null)")


@dataclass
class QuantConfig:
    method: str = "none"
    # A name of qatflash.quant.RECIPES (eager: torch.ao eager mode; torchao: quantize_ with its
    # configs; pt2e: torch.export + X86InductorQuantizer), or a module:Class path of a Recipe.
    api: str = "eager"
    # torch.backends.quantized.engine for conversion and INT8 inference (eager).
    engine: str = "x86"
    activation: ObserverConfig | None = None
    weight: ObserverConfig | None = None
    torchao: TorchaoConfig | None = None
    weight_only: WeightOnlyConfig | None = None
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    # int8: embedding tables quantized weight-only (per-row), about half of a BERT's bytes.
    embeddings: str = "float"
    # ptq_static: training batches that calibrate the observers.
    calibration_batches: int = 32
    # qat: train in float for this many optimizer steps before fake quantization starts ...
    # (Lightning's convention for limit_*_batches: an int counts steps, a float in [0, 1) is a
    # fraction of the fit's steps, e.g. 0.75 = fake-quantize the last 25 %; typed Any because
    # OmegaConf cannot merge an int | float union); null = by what the job trains
    # (`quant.callback.fake_quant_start`: 0 for a pretrained model, 0.75 from scratch)
    fake_quant_start_step: Any = None
    # ... and stop updating observers (scales, zero points) from this step (or fraction) on; null = never.
    freeze_observers_step: Any = None
    # qat: also learn the float model's outputs (quantization-aware distillation); null = the task's loss only.
    distill: DistillConfig | None = None
    # qat: learn the quantization ranges (scales, zero points: LSQ) with the weights, at this
    # learning rate and without weight decay, from where observers (eager: until
    # freeze_observers_step) or the weights (torchao) set them; null = observers set them.
    range_lr: float | None = None
    # qat: train low-rank adapters on the frozen fake-quantized Linears instead of their weights; null = full QAT.
    lora: LoraConfig | None = None
    # api=mixed: the recipe of each named part (a precision: its own quant config, whose targets
    # select the modules it quantizes), applied in turn to one model; the parts share an API whose
    # recipes compose (torchao) and a method, and no module is in two (`qatflash.quant.mixed`).
    parts: dict[str, QuantConfig] | None = None
    # qat (eager api, attention=eager): also fake-quantize the inputs of QKᵀ and probabilities·V.
    attention_matmuls: bool = False
    # eager ptq_static/qat: `quantized` = each INT8 Linear rounds its output to uint8 (torch.ao's
    # default), which the next float op dequantizes; `float` = the int8 GEMM writes float output in
    # the same kernel (fbgemm), and QAT trains without fake quantization on Linear outputs.
    linear_output: str = "quantized"

    def __post_init__(self) -> None:
        _one_of("quant.method", self.method, QUANT_METHODS)
        RECIPES.check(self.api)
        _one_of("quant.engine", self.engine, QUANT_ENGINES)
        _one_of("quant.embeddings", self.embeddings, ("float", "int8"))
        _one_of("quant.linear_output", self.linear_output, ("quantized", "float"))
        _require(
            self.calibration_batches > 0, f"quant.calibration_batches={self.calibration_batches} must be > 0"
        )
        start = self.fake_quant_start_step
        if start is not None:
            _check_step("quant.fake_quant_start_step", start)
        if self.freeze_observers_step is not None:
            _check_step("quant.freeze_observers_step", self.freeze_observers_step)
            freeze = self.freeze_observers_step
            # a default start resolves to step 0 or later: a freeze at step 0 comes after none
            after = freeze > 0 if start is None else type(freeze) is not type(start) or freeze > start
            _require(
                after,
                f"quant.freeze_observers_step={self.freeze_observers_step} must come after "
                f"quant.fake_quant_start_step={'null (0 or later)' if start is None else start}",
            )
        _require(
            bool(self.targets.include) or self.embeddings == "int8",
            "quant.targets.include is empty; use ['*'] for every Linear ([] quantizes the embedding "
            "table alone, with quant.embeddings=int8)",
        )
        _require(
            (self.api == "mixed") == (self.parts is not None),
            f"quant.parts is what quant.api=mixed composes, and only it: api={self.api} with "
            f"parts={None if self.parts is None else list(self.parts)}",
        )
        for name in ("distill", "range_lr", "lora"):
            _require(
                getattr(self, name) is None or self.method == "qat",
                f"quant.{name} needs quant.method=qat (a model that trains quantized), not {self.method}",
            )
        _positive_or_null("quant.range_lr", self.range_lr, " (observers set the ranges)")
        _require(
            self.lora is None or self.range_lr is None,
            "quant.lora with quant.range_lr: ranges learned for the frozen base weights no longer fit "
            "them once the adapters are merged; use one",
        )
        if self.method != "none":
            self._check_eager_features()
            RECIPES.load(self.api).check_config(self)

    def _check_eager_features(self) -> None:
        """Fields only torch.ao eager QAT/PTQ implements: refused with any other API or method."""
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
        _one_of("trainer.precision", str(self.precision), tuple(PRECISIONS))
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


# How decode keeps its keys and values: transformers' DynamicCache (grows per token), StaticCache
# (preallocated to the whole generation), or none (every token re-runs the full sequence).
KV_CACHES = ("dynamic", "static", "none")
# How decode steps run: the model's eager forward, or also one compiled graph over a static cache
# (qatflash.timing.generation), timed beside the eager decode.
DECODE_MODES = ("eager", "compiled")


@dataclass
class TimingConfig:
    """The `benchmark` group: how both apps time forwards, and generation (task=causal_lm)."""

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
    # What runs the timed forwards: names of qatflash.timing.TIMING_BACKENDS (torch (eager),
    # torch_compile, onnxruntime: an optional extra) or module:Class paths of a TimingBackend.
    backends: list[str] = field(default_factory=lambda: ["torch"])
    # Generation (causal LMs): > 0 times prefill (the prompt's forward, up to the first token) and
    # then this many greedy decode steps, each its own sample, instead of a plain forward.
    new_tokens: int = 0
    kv_cache: str = "dynamic"
    # eager, or compiled: each model's decode also through torch.compile (CUDA graphs on CUDA) over
    # a static cache, in the same rounds as its eager decode (needs kv_cache=static, new_tokens > 0).
    decode: str = "eager"
    # Stop timing once this long has passed, even short of min_iters (at least 2 rounds): a budget
    # that keeps 16k-token CPU points to minutes. null = no cap.
    max_duration_s: float | None = None

    def __post_init__(self) -> None:
        _require(
            self.new_tokens >= 0, f"benchmark.new_tokens={self.new_tokens} must be >= 0 (0: forward only)"
        )
        _one_of("benchmark.kv_cache", self.kv_cache, KV_CACHES)
        _one_of("benchmark.decode", self.decode, DECODE_MODES)
        if self.decode == "compiled":
            _require(
                self.new_tokens > 0,
                "benchmark.decode=compiled times decode steps: set benchmark.new_tokens > 0",
            )
            _require(
                self.kv_cache == "static",
                f"benchmark.decode=compiled with benchmark.kv_cache={self.kv_cache}: a compiled step needs "
                "shapes that never change, which only kv_cache=static gives (a dynamic cache grows every "
                "token and recompiles; none feeds the whole sequence)",
            )
        _positive_or_null("benchmark.max_duration_s", self.max_duration_s)
        _require(
            bool(self.backends), "benchmark.backends is empty; allowed: " + ", ".join(TIMING_BACKENDS.names())
        )
        for backend in self.backends:
            TIMING_BACKENDS.check(backend)
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


@dataclass
class BenchConfig:
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
        _one_of("bench.dtype", self.dtype, DTYPES)
        _positive_or_null("bench.max_memory_gb", self.max_memory_gb)


@dataclass
class TaskConfig:
    """What a job learns and is judged by: a name of qatflash.tasks.TASKS or a module:Class path."""

    name: str = "classification"

    def __post_init__(self) -> None:
        TASKS.check(self.name)


# How a sensitivity analysis groups the modules it quantizes one group at a time: each Linear (a
# fused projection such as GPT-2's c_attn is one), each transformer block, or each kind (the same
# projection across blocks: q, k, v, o, gate, up, down), the LM head and the embedding table apart.
SENSITIVITY_GROUPS = ("linear", "block", "kind")
# A search budget's name for each quality statistic a task may be judged by, in the statistic's
# reader's unit: accuracy points lost, percent of perplexity gained.
BUDGETS = {"accuracy": "max_acc_drop", "macro_f1": "max_acc_drop", "ppl": "max_ppl_increase"}


@dataclass
class SearchConfig:
    """What a mixed-precision search chooses under (`qatflash.sensitivity.search`): one recipe per
    budget, each from the front of size against the calibration split's summed quality change."""

    # Quality budgets, in the task statistic's unit: accuracy (or F1) points lost ...
    max_acc_drop: list[float] = field(default_factory=list)
    # ... or percent of perplexity gained (the task decides which applies).
    max_ppl_increase: list[float] = field(default_factory=list)
    # Size ceilings in bytes of the quantizable weights: the least quality change within each.
    max_bytes: list[int] = field(default_factory=list)
    # The exact front (every mix no other beats in both size and change) is kept while it has at
    # most this many mixes; past it, the search turns greedy (and says so).
    exact_front_limit: int = 100_000

    def __post_init__(self) -> None:
        for name in ("max_acc_drop", "max_ppl_increase", "max_bytes"):
            _require(
                all(v >= 0 for v in getattr(self, name)),
                f"sensitivity.search.{name}={list(getattr(self, name))} must be >= 0",
            )
        _require(
            self.exact_front_limit > 0,
            f"sensitivity.search.exact_front_limit={self.exact_front_limit} must be > 0",
        )


@dataclass
class SensitivityConfig:
    """Per-group sensitivity of a float model to quantization (`qatflash.sensitivity`): each group
    quantized alone in each precision, scored on the validation split (never the test split) against
    the float model on the same examples, then a mixed-precision search over the table."""

    # name -> a quant config (compose one with `/quant@sensitivity.precisions.<name>: <quant yaml>`),
    # from the most bytes to the fewest; one precision: float or it, per group.
    precisions: dict[str, QuantConfig] = field(default_factory=dict)
    groups: str = "block"
    # Examples (windows, for a causal LM) of the validation split each group is scored on.
    examples: int = 512
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        _one_of("sensitivity.groups", self.groups, SENSITIVITY_GROUPS)
        _require(self.examples > 0, f"sensitivity.examples={self.examples} must be > 0")
        _require(
            1 <= len(self.precisions) <= 2,
            f"sensitivity.precisions={list(self.precisions)}: give one or two precisions of one recipe family",
        )
        for name, precision in self.precisions.items():
            _require(
                precision.method in ("ptq_dynamic", "ptq_static", "ptq_weight_only"),
                f"sensitivity.precisions.{name} has quant.method={precision.method}; a float model's "
                "sensitivity is measured by post-training quantization (ptq_*)",
            )


@dataclass
class SharedRoot:
    """The groups both apps read: a task, a model, its attention, timing settings and experiment tracking."""

    task: TaskConfig = MISSING
    model: ModelConfig = MISSING
    attention: AttentionConfig = MISSING
    benchmark: TimingConfig = MISSING
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
    # e.g. [test/acc] or [test/acc, latency/quantized/torch/p50_ms] with directions [maximize, minimize];
    # null = the task's headline figure.
    objective: list[str] | None = None
    # Also measure each module group's sensitivity and search mixed precisions (a float job only).
    sensitivity: SensitivityConfig | None = None

    def __post_init__(self) -> None:
        _require(
            self.sensitivity is None or self.quant.method == "none",
            f"sensitivity measures a float model quantized one group at a time; quant.method="
            f"{self.quant.method} (use quant=fp32: the precisions go in sensitivity.precisions)",
        )
        _require(
            not self.quant.attention_matmuls or self.attention.implementation == "eager",
            f"quant.attention_matmuls=true fake-quantizes eager attention's matmuls, but "
            f"attention={self.attention.implementation} runs a fused kernel; use attention=eager",
        )
        spawned = self.trainer.strategy.startswith("ddp_spawn")
        unpicklable = self.quant.method != "none" and RECIPES.load(self.quant.api).unpicklable
        _require(
            not (spawned and unpicklable),
            f"trainer.strategy={self.trainer.strategy} sends the model to its workers by pickle, which "
            f"quant.api={self.quant.api}'s {unpicklable}; use another quant.api, or one device",
        )
        _require(
            not (spawned and self.quant.lora is not None),
            f"trainer.strategy={self.trainer.strategy} with quant.lora: its workers merge the adapters at "
            "the fit's end and hand back weights this process's adapted model cannot load; use ddp or one device",
        )
        if self.sensitivity is not None:
            self._check_budgets(self.sensitivity.search)
        TASKS.load(self.task.name).check_config(self)

    @property
    def optim(self) -> OptimConfig:
        """The fit's optimizer settings: model.optim, at quant.lora.lr where LoRA sets a rate of its own."""
        lora = self.quant.lora
        if lora is None or lora.lr is None:
            return self.model.optim
        return replace(self.model.optim, lr=lora.lr)

    def _check_budgets(self, search: SearchConfig) -> None:
        """A quality budget is in the unit of the statistic the task is judged by."""
        quality = TASKS.load(self.task.name).quality
        for name in ("max_acc_drop", "max_ppl_increase"):
            _require(
                not getattr(search, name) or name == BUDGETS[quality],
                f"sensitivity.search.{name}={list(getattr(search, name))}: task={self.task.name} is judged "
                f"by {quality}; its budget is sensitivity.search.{BUDGETS[quality]}",
            )


@dataclass
class BenchAppConfig(SharedRoot):
    """The root of `qatflash-bench`: the shared groups and the sweep of points, no training."""

    bench: BenchConfig = field(default_factory=BenchConfig)
    # A recipe that needs no data (dynamic or weight-only PTQ), applied to the built model and timed
    # beside it; fp32 (method none) times the model alone.
    quant: QuantConfig = MISSING


def register_schema() -> None:
    """The schemas that `conf/config.yaml` (`schema`) and `conf/bench.yaml` (`bench_schema`) compose
    onto, and the resolver that names sweep points' folders (`point_dir`)."""
    from qatflash.job import point_dir

    ConfigStore.instance().store(name="schema", node=Config)
    ConfigStore.instance().store(name="bench_schema", node=BenchAppConfig)
    OmegaConf.register_new_resolver("point_dir", point_dir, replace=True)


def to_config(cfg: DictConfig) -> Any:
    """Resolve interpolations and build the dataclasses (Config or BenchAppConfig), which runs every
    `__post_init__` check."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
