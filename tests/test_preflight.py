"""Documented commands run: every `qatflash` / `qatflash-bench` command written in a preset's comments,
in README's GPU section and in the GPU check composes and passes its app's config-level checks
(qatflash.preflight: schema, recipe configs, device, lengths against positions, attention against
device and precision, timing backends, recipe against device, the memory cap), CUDA faked at torch's
boundary where a command needs it; and the GPU check's dry run, as CI runs it."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO

from qatflash.errors import ConfigError
from qatflash.preflight import APPS, Point, check, points


def _load_gpu_check() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()
_APP_COMMAND = re.compile(r"^(qatflash|qatflash-bench)\s")


def commands_in(text: str) -> list[str]:
    """The app commands in a text: whole lines (a YAML comment's or a code block's, continued by a
    trailing backslash, less a trailing # comment) and inline code spans (`...`, across lines)."""
    joined = re.sub(r"\\\n[#\s]*", " ", text)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", joined)]
    lines = [re.sub(r"\s+#.*$", "", line.lstrip("# ").strip()) for line in joined.splitlines()]
    return [c for c in [*lines, *spans] if _APP_COMMAND.match(c)]


def _gpu_section(readme: str) -> str:
    start = readme.index("\n### GPU\n")
    return readme[start : readme.index("\n### ", start + 1)]


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command in the presets' comments, README's GPU section and the GPU check."""
    found = []
    for preset in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        comments = "\n".join(line for line in preset.read_text().splitlines() if line.startswith("#"))
        found += [(f"conf/experiment/{preset.name}", c) for c in commands_in(comments)]
    found += [("README.md GPU", c) for c in commands_in(_gpu_section((REPO / "README.md").read_text()))]
    steps = gpu_check.steps(Path("/tmp/gpu_check"), REPO.parent / "shared" / "data")
    found += [(f"gpu_check {s.name}", shlex.join([s.app, *s.args])) for s in steps if s.app in APPS]
    return found


_NOT_INSTALLED = re.compile(r"needs the Python package '(\w+)', which is not installed")


def _missing_here(point: Point) -> str | None:
    """Run the point's checks, under a fake CUDA if it runs on one. A refusal naming a package that
    is really missing here (flash-attn: CUDA only) is this machine's, not the command's: returned."""
    try:
        gpu_check.preflight(point)
    except ConfigError as error:
        missing = _NOT_INSTALLED.search(str(error))
        if missing is None or importlib.util.find_spec(missing.group(1)) is not None:
            raise
        return missing.group(1)
    return None


@pytest.mark.parametrize(("where", "command"), documented_commands(), ids=lambda v: v[:60])
def test_every_documented_command_composes_and_passes_its_config_checks(where: str, command: str) -> None:
    app, *args = shlex.split(command)
    missing = {package for point in points(app, args) if (package := _missing_here(point))}
    if missing:  # every other point of the command was checked
        pytest.skip(f"some points need {sorted(missing)}, which are not installed here")


def test_the_documents_hold_the_commands_this_test_reads() -> None:
    """The extraction finds what is there: the GPU commands of the presets, README and the check."""
    found = documented_commands()
    where = {w for w, _ in found}
    assert {"README.md GPU", "conf/experiment/llm_attention_scaling.yaml"} <= where
    assert sum(w.startswith("gpu_check") for w in where) == len(
        [s for s in gpu_check.steps(Path("/tmp"), Path("/tmp")) if s.app in APPS]
    )
    gpu = [c for _, c in found if "bench.device=cuda" in c or "trainer=gpu" in c]
    assert len(gpu) >= 8, gpu


@pytest.mark.parametrize(
    ("command", "refusal"),
    [
        # gpu_llm_check.sh's 16k training: 16,384 + 32 new tokens > llama_tiny's 16,384 positions
        (
            "qatflash task=causal_lm model=llama_tiny data=wikitext2 trainer=gpu attention=sdpa_flash "
            "data.max_length=16384 benchmark.new_tokens=32",
            r"benchmark.seq_len \+ benchmark.new_tokens=16416 exceeds the model's position limit 16384",
        ),
        # the llm_attention_scaling preset's GPU comment: 32,768 + 16 > llama_small's 32,768
        (
            "qatflash-bench -m experiment=llm_attention_scaling bench.device=cuda bench.dtype=bfloat16 "
            "bench.seq_lens=[1024,4096,16384,32768] attention=eager,sdpa,sdpa_flash",
            r"bench.seq_lens \+ benchmark.new_tokens holds \[32784\], beyond the model's position limit 32768",
        ),
        # a recipe whose kernels the command's device lacks: refused without the device
        (
            "qatflash-bench -m experiment=llm_decode_weight_only bench.device=cuda quant=wo_packed_int8",
            r"quant.api=packed makes int8_wo_packed, whose kernels run on \['cpu'\]; bench.device=cuda has none",
        ),
    ],
    ids=["gpu_llm_check_16k", "llm_attention_scaling_32k", "packed_on_cuda"],
)
def test_the_commands_that_could_not_run_are_refused(command: str, refusal: str) -> None:
    """The two documented commands refused on the H200 before they were fixed: the checks above
    would have caught them here, on a machine without a GPU."""
    app, *args = shlex.split(command)
    point = points(app, args)[-1]  # the longest length, the GPU-only recipe
    with gpu_check.fake_cuda(), pytest.raises(ConfigError, match=refusal):
        check(point)


def test_a_sweep_expands_as_hydras_basic_sweeper_does() -> None:
    """The preset's sweep first, the command line's values winning: one point per combination."""
    swept = points("qatflash-bench", ["-m", "experiment=llm_decode_weight_only", "quant=fp32,wo_bnb_nf4"])
    assert [dict(o.split("=", 1) for o in p.overrides)["quant"] for p in swept] == ["fp32", "wo_bnb_nf4"]
    assert len(points("qatflash", ["-m", "experiment=llm_hybrid_qat_flash"])) == 6  # 3 recipes x 2 lengths
    assert points("qatflash", ["model=llama_tiny"]) == [Point("qatflash", ("model=llama_tiny",))]


def test_the_fake_cuda_memory_cap_is_as_strict_as_torch() -> None:
    """torch's own setter runs under the fake: a bare "cuda" is refused as on a GPU (the H200's
    failure), the indexed device the bench resolves is capped at its share of the device."""
    from qatflash.bench.points import cap_memory
    from qatflash.job import resolve_device

    with gpu_check.fake_cuda(total_memory=100 * 2**30) as cuda:
        device = resolve_device("bench.device", "cuda")
        assert device == torch.device("cuda", 0)
        cap_memory(12, device)
        with pytest.raises(ValueError, match=r"Expected a torch\.device with a specified index"):
            cap_memory(12, torch.device("cuda"))
    assert cuda.fractions == [(0.12, 0)]


@pytest.mark.processes
def test_the_gpu_checks_dry_run_passes_as_ci_runs_it(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [s.name for s in gpu_check.steps(tmp_path, tmp_path)]
    reported = re.findall(r"^(\w+): (ok|skipped)", done.stdout, flags=re.MULTILINE)
    assert [name for name, _ in reported] == steps


def test_a_step_that_stops_composing_fails_the_dry_run(tmp_path: Path) -> None:
    """What keeps the GPU check from rotting: a step refused here fails its dry run, and the check."""
    broken = gpu_check.Step(
        "too_long",
        "a prompt beyond llama_small's positions",
        "qatflash-bench",
        ("task=causal_lm", "model=llama_small", "bench.device=cuda", "bench.seq_lens=[40000]"),
        10,
    )
    outcome = gpu_check.dry_run(broken)
    assert outcome.status == "failed" and "beyond the model's position limit 32768" in outcome.detail
