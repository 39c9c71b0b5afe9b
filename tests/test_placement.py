"""Where models run (qatflash.placement): every timed or generating model is placed on its contender's
device whatever an earlier stage left it on, with the tensors quantization libraries hang on it.

Without a second real device here, "another device" is torch's meta device, and each module call
checks what a CUDA kernel checks: that its tensors and its inputs sit on one device."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DECODER
from torch import nn
from transformers import AutoModelForCausalLM

from qatflash.config import to_config
from qatflash.models import build_model_from_config, declared_config
from qatflash.pipeline import latency_rows
from qatflash.placement import attached_tensors, misplaced, place
from qatflash.quant import make_recipe
from qatflash.tasks import TASKS
from qatflash.timing import latency
from qatflash.timing.latency import Contender

CPU, META = torch.device("cpu"), torch.device("meta")
DECODE = ["benchmark.warmup=1", "benchmark.min_iters=2", "benchmark.min_duration_s=0", "benchmark.seq_len=8"]


def _strict_devices(model: nn.Module) -> None:
    """Make every module call fail, as a CUDA kernel does, when its own tensors and its tensor inputs
    are not all on one device (on the meta device torch itself does not check)."""

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        given = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
        devices = {str(t.device) for t in [*own, *given]}
        if len(devices) > 1:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found {sorted(devices)}")

    for module in model.modules():
        module.register_forward_pre_hook(check, with_kwargs=True)


def _decoder(make_cfg, *overrides: str):
    cfg = to_config(
        make_cfg("task=causal_lm", "data=wikitext2", "model=llama_tiny", *TINY_DECODER, *overrides)
    )
    return cfg, build_model_from_config(declared_config(cfg.model), cfg.attention, AutoModelForCausalLM)


@pytest.mark.parametrize("placed", [True, False], ids=["placed", "broken_not_placed"])
@pytest.mark.parametrize("new_tokens", [0, 4], ids=["forward", "generate"])
def test_a_model_left_on_another_device_is_placed_on_its_contenders_before_it_is_timed(
    make_cfg, monkeypatch: pytest.MonkeyPatch, new_tokens: int, placed: bool
) -> None:
    """The H200's failure: generation after a GPU fit timed a model Lightning's teardown had left on
    the CPU with inputs on CUDA. Here the model sits on the CPU and its contender runs on another
    device; the latency rows place it there (both scenarios), or, broken, fail as CUDA did."""
    cfg, model = _decoder(make_cfg, f"benchmark.new_tokens={new_tokens}", *DECODE)
    _strict_devices(model)
    if not placed:
        monkeypatch.setattr(latency, "place", lambda model, device: model)
    rows = lambda: latency_rows(  # noqa: E731
        cfg,
        TASKS.load("causal_lm")(cfg),
        {("float", "torch"): Contender(model, META)},
        model.config,
        {"torch"},
    )
    if not placed:
        with pytest.raises(RuntimeError, match=r"on the same device, but found \['cpu', 'meta'\]"):
            rows()
        return
    (row,) = rows()
    assert row["device"] == "meta" and row["scenario"] == ("generate" if new_tokens else "forward")
    assert row["iters"] >= 2 and misplaced(model, META) == []


@pytest.mark.needs("bnb")
@pytest.mark.parametrize("recipe", ["wo_bnb_int8", "wo_bnb_nf4"])
def test_bitsandbytes_quantization_state_is_part_of_what_is_placed(make_bench_cfg, recipe: str) -> None:
    """LLM.int8's int8 matrix and row scales hang on the weight (then, after a forward, on the
    module's matmul state); NF4's block scales, nested ones included, on the weight's quant_state.
    `nn.Module.to` moves none of them (on the H200: "Expected a cuda device, but got: cpu" in the
    int8 matmul). Every one is among the tensors placement moves and checks."""
    cfg = to_config(make_bench_cfg("task=causal_lm", "model=llama_tiny", *TINY_DECODER, f"quant={recipe}"))
    model = build_model_from_config(declared_config(cfg.model), cfg.attention, AutoModelForCausalLM)
    quantizer = make_recipe(cfg.quant)
    quantized = quantizer.convert(quantizer.prepare(model))
    targets = quantizer.targets
    assert len(targets) == 15  # 2 layers x 7 projections + the LM head

    def state() -> set[str]:
        return {name for _, _, name, _ in attached_tensors(quantized)}

    if recipe == "wo_bnb_int8":
        expected = {f"{t}.weight.{s}" for t in targets for s in ("CB", "SCB")}
    else:
        parts = ("absmax", "code", "offset", "state2.absmax", "state2.code")
        expected = {f"{t}.weight.quant_state.{s}" for t in targets for s in parts}
    assert state() == expected
    assert {name.split(" (")[0] for name in misplaced(quantized, META)} >= expected
    place(quantized, CPU)(input_ids=torch.randint(0, 512, (1, 8)))
    if recipe == "wo_bnb_int8":  # the first forward moved the matrix and scales onto the module's state
        assert state() == {f"{t}.state.{s}" for t in targets for s in ("CB", "SCB", "idx")}
    assert misplaced(place(quantized, CPU), CPU) == []


def test_a_tensor_that_was_a_weights_data_follows_the_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a device change `.to` gives each weight new storage in place and leaves attributes on the
    old one (bitsandbytes' `CB` is its weight's int8 data): that alias must follow the weight, not
    be copied beside it. Here the change of storage is what a move to CUDA does, on the CPU; an
    attribute of its own (a scale) is moved, not aliased."""
    linear = nn.Linear(4, 4)
    linear.weight.CB = linear.weight.data
    linear.weight.SCB = torch.ones(4)
    model = nn.Sequential(linear)

    def to_new_storage(self: nn.Module, device: torch.device) -> nn.Module:
        for param in self.parameters():
            param.data = param.data.clone()
        return self

    monkeypatch.setattr(nn.Module, "to", to_new_storage)
    before = linear.weight.data_ptr()
    place(model, CPU)
    assert linear.weight.data_ptr() != before  # the simulated move happened
    assert linear.weight.CB.data_ptr() == linear.weight.data_ptr()
    assert linear.weight.SCB.data_ptr() != linear.weight.data_ptr()


def test_a_state_objects_tensor_is_moved_with_the_model() -> None:
    """A tensor a library keeps on a state object of a module (as bitsandbytes' matmul state): `.to`
    leaves it, placement moves it."""

    class State:
        def __init__(self) -> None:
            self.scale = torch.ones(2)

    linear = nn.Linear(2, 2)
    linear.state = State()
    place(linear, META)
    assert linear.state.scale.device == META and misplaced(linear, META) == []


def test_placement_needs_an_indexed_cuda_device_and_misplaced_names_each_stray_tensor() -> None:
    with pytest.raises(ValueError, match=r"needs an indexed CUDA device \(cuda:0\), got cuda"):
        place(nn.Linear(2, 2), torch.device("cuda"))

    class Holder:  # a library's state object, holding a tensor elsewhere
        def __init__(self) -> None:
            self.scale = torch.empty(2, device=META)

    linear = nn.Linear(2, 2)
    linear.state = Holder()
    assert misplaced(linear, CPU) == ["state.scale (meta)"]


def test_the_job_device_of_a_gpu_trainer_is_indexed(monkeypatch: pytest.MonkeyPatch) -> None:
    """One authority for the device: trainer.accelerator=gpu and bench.device=cuda both resolve to
    the current CUDA device with its index, which placement and torch's per-device calls need."""
    from qatflash.job import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("trainer.accelerator", "gpu") == torch.device("cuda", 0)
    assert resolve_device("bench.device", "cuda") == torch.device("cuda", 0)
    assert resolve_device("trainer.accelerator", "cpu") == CPU


@pytest.mark.needs("cuda")
@pytest.mark.needs("bnb")
@pytest.mark.parametrize("recipe", ["wo_bnb_int8", "wo_bnb_nf4"])
def test_bitsandbytes_models_quantized_on_the_cpu_run_on_cuda_once_placed(
    make_bench_cfg, recipe: str
) -> None:
    """The H200's failure itself: bitsandbytes quantizes on the CPU (as the recipes convert), the
    model is placed on the GPU, and its int8 / NF4 matmuls run there with nothing left behind."""
    from qatflash.job import resolve_device

    cuda = resolve_device("bench.device", "cuda")
    cfg = to_config(make_bench_cfg("task=causal_lm", "model=llama_tiny", *TINY_DECODER, f"quant={recipe}"))
    model = build_model_from_config(declared_config(cfg.model), cfg.attention, AutoModelForCausalLM)
    quantizer = make_recipe(cfg.quant)
    quantized = place(quantizer.convert(quantizer.prepare(model.half())), cuda)
    with torch.inference_mode():
        logits = quantized(input_ids=torch.randint(0, 512, (1, 8), device=cuda)).logits
    assert logits.device == cuda and logits.isfinite().all()
    assert misplaced(quantized, cuda) == []
