"""README's "when things go wrong" table, row by row, through the command line.

Each bad input must end the command with a non-zero exit code and one line naming the value and
what is allowed, before any training step, and must leave no results.json that says `ok`.
The checks behind each row are unit-tested beside their modules; this is the user's view of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FAST
from datasets import Dataset

from qatflash import ort
from qatflash.cli import bench_main
from qatflash.results import read_results, write_json_atomic


def _csv_folder(folder: Path, header: str = "text,label", rows: str = "a,0\nb,1\n", splits=None) -> Path:
    folder.mkdir()
    for split in splits or ("train", "validation", "test"):
        (folder / f"{split}.csv").write_text(f"{header}\n{rows}")
    return folder


# (README row, overrides with {tmp} for the test's folder, a folder to prepare, exit code, message)
HYDRA, REFUSED = 1, 2
ROWS: list[tuple[str, list[str], Callable[[Path], object] | None, int, str]] = [
    ("unknown option", ["attention=fastest"], None, HYDRA, "Could not find 'attention/fastest'"),
    (
        "wrong type",
        ["data.max_length=long"],
        None,
        HYDRA,
        "Value 'long' of type 'str' could not be converted",
    ),
    ("max_length <= 0", ["data.max_length=0"], None, REFUSED, "data.max_length=0 must be > 0"),
    ("batch size <= 0", ["data.batch_size=0"], None, REFUSED, "data.batch_size=0 must be > 0"),
    (
        "bad precision",
        ["trainer.precision=8-true"],
        None,
        REFUSED,
        "trainer.precision='8-true' is not allowed",
    ),
    (
        "max_length above positions",
        ["data.max_length=600"],
        None,
        REFUSED,
        "data.max_length=600 exceeds the model's position limit 512; use <= 512",
    ),
    ("data.path missing", ["data=local", "data.path={tmp}/none"], None, REFUSED, "is not a folder"),
    (
        "split missing",
        ["data=local", "data.path={tmp}/d"],
        lambda t: _csv_folder(t / "d", splits=("train", "validation")),
        REFUSED,
        "has no 'test' file",
    ),
    (
        "empty file",
        ["data=local", "data.path={tmp}/d"],
        lambda t: _csv_folder(t / "d", rows=""),
        REFUSED,
        "needs at least one row",
    ),
    (
        "text column missing",
        ["data=local", "data.path={tmp}/d"],
        lambda t: _csv_folder(t / "d", header="review,label"),
        REFUSED,
        "data.text_column=text is not a column of the train split",
    ),
    (
        "labels vs num_labels",
        ["data=local", "data.path={tmp}/d", "data.num_labels=3"],
        lambda t: _csv_folder(t / "d"),
        REFUSED,
        "data.num_labels=3 does not match the 2 labels",
    ),
    (
        "flash_attention_2 here",
        ["attention=flash_attention_2"],
        None,
        REFUSED,
        "attention=flash_attention_2 needs",
    ),
    (
        "attention the model class lacks",
        ["model.arch.model_type=deberta-v2", "attention=sdpa"],
        None,
        REFUSED,
        "attention=sdpa is not supported by DebertaV2ForSequenceClassification; it supports ['eager'",
    ),
    (
        "model package not installed",
        ["model.name_or_path=pkg://no_such_model_package/model"],
        None,
        REFUSED,
        "model.name_or_path=pkg://no_such_model_package/model needs the Python package 'no_such_model_package'",
    ),
    (
        "SDPA kernel the device lacks",
        ["attention.sdpa_backend=efficient"],
        None,
        REFUSED,
        "attention.sdpa_backend=efficient has no kernel on cpu",
    ),
    (
        "SDPA kernel without SDPA",
        ["attention=eager", "attention.sdpa_backend=flash"],
        None,
        REFUSED,
        "attention.sdpa_backend=flash forces an SDPA kernel, but attention=eager does not use SDPA",
    ),
    (
        "unknown engine",
        ["quant=qat_x86", "quant.engine=tpu"],
        None,
        REFUSED,
        "quant.engine='tpu' is not allowed; choose one of ['x86', 'fbgemm', 'qnnpack', 'onednn']",
    ),
    (
        "patterns matching no module",
        ["quant=qat_x86", "quant.targets.include=[*mlp.fc*]"],
        None,
        REFUSED,
        "match no nn.Linear; this model's Linear layers are named like",
    ),
    (
        "attention matmuls with a fused kernel",
        ["quant=qat_x86", "quant.attention_matmuls=true", "attention=sdpa"],
        None,
        REFUSED,
        "quant.attention_matmuls=true fake-quantizes eager attention's matmuls",
    ),
    (
        "freeze before fake-quant start",
        ["quant=qat_x86", "quant.freeze_observers_step=0"],
        None,
        REFUSED,
        "must come after quant.fake_quant_start_step=null (0 or later)",
    ),
    (
        "float Linear outputs without the kernel",
        ["quant=qat_x86_a8w7_float_out", "quant.engine=qnnpack"],
        None,
        REFUSED,
        "quant.linear_output=float needs quant.engine in ['x86', 'fbgemm'] (fbgemm's float-output kernel), "
        "not qnnpack",
    ),
    (
        "DDP workers with pt2e graphs",
        ["quant=qat_pt2e_x86", "trainer=ddp"],
        None,
        REFUSED,
        "trainer.strategy=ddp_spawn sends the model to its workers by pickle, which quant.api=pt2e's",
    ),
    (
        "torchao argument its config class lacks",
        ["quant=qat_torchao_int8", "+quant.torchao.convert.group_size=32"],
        None,
        REFUSED,
        "quant.torchao.convert: Int8DynamicActivationInt8WeightConfig takes no ['group_size']; it takes [",
    ),
    (
        "torchao granularity name unknown",
        ["quant=qat_torchao_int8", "quant.torchao.activation.granularity=per_block"],
        None,
        REFUSED,
        "quant.torchao.activation.granularity='per_block': use one of ['per_token', 'per_tensor', "
        "'per_channel', 'per_row', 'per_group:<n>']",
    ),
    (
        "torchao QAT simulating other weights than it ships",
        ["quant=qat_torchao_8da4w", "quant.torchao.convert.weight_granularity=per_channel"],
        None,
        REFUSED,
        "quant.torchao.weight fake-quantizes otherwise than quant.torchao.convert "
        "(Int8DynamicActivationIntxWeightConfig) ships: granularity PerGroup(group_size=32) where it ships "
        "PerAxis(axis=0); QAT must simulate what ships",
    ),
    (
        "data of another task's kind",
        ["data.kind=causal_lm"],
        None,
        REFUSED,
        "data.kind='causal_lm' is data for another task; task=classification reads data.kind='classification'",
    ),
    (
        "unknown benchmark backend",
        ["benchmark.backends=[onnx]"],
        None,
        REFUSED,
        "benchmark.backends entry='onnx' is not allowed",
    ),
    (
        "repeated benchmark backend",
        ["benchmark.backends=[torch,torch]"],
        None,
        REFUSED,
        "benchmark.backends=['torch', 'torch'] repeats a backend",
    ),
    (
        "bad evaluation padding",
        ["data.eval_padding=fixed"],
        None,
        REFUSED,
        "data.eval_padding='fixed' is not allowed; choose one of ['longest', 'max_length']",
    ),
    ("bad logger mode", ["logger.mode=cloud"], None, REFUSED, "logger.mode='cloud' is not allowed"),
    (
        "sensitivity of a quantized job",
        ["quant=ptq_static", "+quant@sensitivity.precisions.int8=ptq_static"],
        None,
        REFUSED,
        "sensitivity measures a float model quantized one group at a time; quant.method=ptq_static",
    ),
    (
        "sensitivity budget in another task's unit",
        ["+quant@sensitivity.precisions.int8=ptq_static", "sensitivity.search.max_ppl_increase=[1]"],
        None,
        REFUSED,
        "sensitivity.search.max_ppl_increase=[1.0]: task=classification is judged by accuracy; its budget "
        "is sensitivity.search.max_acc_drop",
    ),
    (
        "sensitivity precision that trains",
        ["+quant@sensitivity.precisions.int8=qat_x86"],
        None,
        REFUSED,
        "sensitivity.precisions.int8 has quant.method=qat; a float model's sensitivity is measured by "
        "post-training quantization",
    ),
    (
        "sensitivity precisions of other modules",
        [
            "+quant@sensitivity.precisions.int8=ptq_static",
            "+quant@sensitivity.precisions.int8ffn=ptq_static",
            "sensitivity.precisions.int8ffn.targets.include=[*intermediate.dense]",
        ],
        None,
        REFUSED,
        "sensitivity.precisions.int8ffn selects other modules than sensitivity.precisions.int8",
    ),
    (
        "unknown sensitivity grouping",
        ["+quant@sensitivity.precisions.int8=ptq_static", "sensitivity.groups=layer"],
        None,
        REFUSED,
        "sensitivity.groups='layer' is not allowed; choose one of ['linear', 'block', 'kind']",
    ),
    (
        "negative labels",
        ["data=local", "data.path={tmp}/d"],
        lambda t: _csv_folder(t / "d", rows="a,-1\nb,1\n"),
        REFUSED,
        "integer labels must be >= 0",
    ),
    (
        "observer that does not fit the qscheme",
        ["quant=qat_x86", "quant.weight.observer=minmax"],
        None,
        REFUSED,
        "quant qscheme=per_channel_symmetric needs a per-channel observer, not observer=minmax",
    ),
    (
        "empty quant range",
        ["quant=qat_x86", "quant.activation.quant_min=300"],
        None,
        REFUSED,
        "quant range [300, 255] is empty",
    ),
    (
        "batch limit that is neither a count nor a fraction",
        ["trainer.limit_train_batches=1.5"],
        None,
        REFUSED,
        "trainer.limit_train_batches=1.5 must be an int (batches), a float in [0, 1] (a fraction) or null",
    ),
    # The synthetic task of FAST: 256 training sentences in batches of 32, one epoch = 8 optimizer steps.
    (
        "fake quantization starting after the fit",
        ["quant=qat_x86", "quant.fake_quant_start_step=8"],
        None,
        REFUSED,
        "quant.fake_quant_start_step=8 is not below the fit's 8 optimizer steps (1 epoch(s) x 8 batches of 32 "
        "from 256 training examples over 1 process(es), accumulating 1)",
    ),
    (
        "observers freezing after the fit",
        ["quant=qat_x86", "quant.freeze_observers_step=50"],
        None,
        REFUSED,
        "quant.freeze_observers_step=50 is not below the fit's 8 optimizer steps",
    ),
    (
        "QAT schedule past a fit shortened by accumulation",
        ["quant=qat_x86", "trainer.accumulate_grad_batches=4", "quant.fake_quant_start_step=2"],
        None,
        REFUSED,
        "quant.fake_quant_start_step=2 is not below the fit's 2 optimizer steps",
    ),
    (
        "QAT schedule past a fit split over DDP workers",
        ["quant=qat_x86", "trainer=ddp", "quant.fake_quant_start_step=4"],
        None,
        REFUSED,
        "quant.fake_quant_start_step=4 is not below the fit's 4 optimizer steps (1 epoch(s) x 4 batches of 32 "
        "from 256 training examples over 2 process(es)",
    ),
    (
        "forced SDPA kernel that cannot train with the model's attention dropout",
        ["attention.sdpa_backend=flash"],
        None,
        REFUSED,
        "attention.sdpa_backend=flash takes no attention dropout on cpu, and training would pass this "
        "model's attention_probs_dropout_prob=0.1",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "prepare", "code", "message"), [row[1:] for row in ROWS], ids=[r[0] for r in ROWS]
)
def test_bad_input_is_refused_before_training(
    run_app, tmp_path: Path, overrides: list[str], prepare, code: int, message: str
) -> None:
    if prepare is not None:
        prepare(tmp_path)
    run_dir = tmp_path / "run"
    args = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    fast = [] if "data=local" in args else FAST  # FAST sizes the synthetic task
    exit_code, stderr = run_app(*args, *fast, "logger=csv", f"hydra.run.dir={run_dir}")
    assert "Traceback" not in stderr
    assert exit_code == code, stderr[-2000:]
    assert message in stderr
    if code == REFUSED:
        (line,) = [line for line in stderr.splitlines() if line.startswith("qatflash: error:")]
        assert message in line
    record = read_results(run_dir)
    assert record is None or record["status"] == "failed"
    # Refused before the first training step: Lightning never wrote a metric.
    assert not list(run_dir.rglob("metrics.csv"))


def test_a_bench_artifact_folder_without_an_artifact_is_refused(run_app, tmp_path: Path) -> None:
    exit_code, stderr = run_app(
        f"bench.artifact={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}", entry=bench_main
    )
    assert exit_code == REFUSED
    (line,) = [line for line in stderr.splitlines() if line.startswith("qatflash: error:")]
    assert f"bench.artifact={tmp_path} is not a run folder with a readable results.json" in line
    assert read_results(tmp_path / "run") is None or read_results(tmp_path / "run")["status"] == "failed"


@pytest.mark.parametrize(
    ("refused", "message", "accepted", "loads_rows"),
    [
        # The CPU flash kernel takes no dropout: refused before any data is read, accepted without dropout.
        (
            ["attention.sdpa_backend=flash"],
            "attention.sdpa_backend=flash takes no attention dropout on cpu",
            ["model.arch.attention_probs_dropout_prob=0"],
            False,
        ),
        # 3 rows in batches of 1, 2 epochs = 6 steps: counted from the indexed rows, before tokenizing.
        (
            ["quant=qat_x86", "quant.fake_quant_start_step=6"],
            "quant.fake_quant_start_step=6 is not below the fit's 6 optimizer steps",
            ["quant.fake_quant_start_step=5"],
            True,
        ),
    ],
    ids=["sdpa_kernel_dropout", "qat_schedule"],
)
def test_the_new_refusals_stop_before_data_is_tokenized_and_their_fixes_run(
    run_app, tmp_path: Path, refused: list[str], message: str, accepted: list[str], loads_rows: bool
) -> None:
    data = _csv_folder(tmp_path / "d", rows="a b,0\nc d,1\ne f,0\n")
    cache = tmp_path / "cache"
    job = [
        "data=local",
        f"data.path={data}",
        f"data.cache_dir={cache}",
        "data.batch_size=1",
        "trainer.max_epochs=2",
        "benchmark=none",
        "logger=csv",
    ]
    exit_code, stderr = run_app(*job, *refused, f"hydra.run.dir={tmp_path / 'refused'}")
    assert exit_code == REFUSED and "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("qatflash: error:")]
    assert message in line
    assert read_results(tmp_path / "refused")["status"] == "failed"
    # Nothing tokenized (no cached table has token ids); the schedule's check reads the rows to
    # count them, the kernel's check nothing at all.
    tables = [Dataset.from_file(str(path)) for path in cache.rglob("*.arrow")]
    assert bool(tables) == loads_rows
    assert not any("input_ids" in table.column_names for table in tables)
    exit_code, stderr = run_app(*job, *refused, *accepted, f"hydra.run.dir={tmp_path / 'accepted'}")
    assert exit_code == 0, stderr[-2000:]
    assert read_results(tmp_path / "accepted")["status"] == "ok"


def test_onnxruntime_without_the_extra_is_refused(
    run_app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The onnx extra is installed wherever the suite runs, so its absence is simulated at the import check."""
    monkeypatch.setattr(ort, "_PACKAGES", ("onnxruntime", "no_such_onnx_package"))
    exit_code, stderr = run_app(
        *FAST, "benchmark.backends=[torch,onnxruntime]", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert exit_code == REFUSED
    (line,) = [line for line in stderr.splitlines() if line.startswith("qatflash: error:")]
    assert "benchmark.backends includes onnxruntime, but ['no_such_onnx_package'] are not installed" in line
    assert read_results(tmp_path / "run")["status"] == "failed"


def test_a_bench_artifact_run_without_an_int8_artifact_is_refused(run_app, tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "fp32_run" / "results.json", {"schema": 1, "status": "ok", "model": {}})
    exit_code, stderr = run_app(
        f"bench.artifact={tmp_path / 'fp32_run'}", f"hydra.run.dir={tmp_path / 'run'}", entry=bench_main
    )
    assert exit_code == REFUSED
    (line,) = [line for line in stderr.splitlines() if line.startswith("qatflash: error:")]
    assert "holds no quantized artifact (quant=fp32 runs save none" in line


def test_a_forced_kernel_is_refused_for_a_decoder_whose_attention_drops_out(
    run_app, text_corpus: Path, tmp_path: Path
) -> None:
    """Llama keeps its attention dropout under `attention_dropout`, not BERT's key: unread, the CPU
    flash kernel was let through and training died in its first step with "No available kernel"."""
    decoder = ["task=causal_lm", "data=text", f"data.path={text_corpus}", f"data.cache_dir={tmp_path}"]
    forced = ["model=llama_tiny", "model.arch.attention_dropout=0.1", "attention.sdpa_backend=flash"]
    exit_code, stderr = run_app(*decoder, *forced, "logger=csv", f"hydra.run.dir={tmp_path / 'run'}")
    assert exit_code == REFUSED, stderr[-2000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("qatflash: error:")]
    assert "training would pass this model's attention_dropout=0.1; set it to 0" in line
