"""Which layers to quantize: per-group sensitivity on the validation split, the mixed-precision
search over it, and the mixed recipes it writes."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LM_FAST, TINY_DECODER, LearnedDecoder
from omegaconf import OmegaConf
from scipy import stats
from test_attention_profile import _llama
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from qatflash.config import QuantConfig
from qatflash.errors import ConfigError
from qatflash.preflight import compose_config
from qatflash.quant import make_recipe
from qatflash.results import SENSITIVITY_FILE, read_results
from qatflash.sensitivity.groups import module_groups
from qatflash.sensitivity.search import EXACT, GREEDY, Option, best_within, search_front, smallest_within

# --- the search: pure numbers ----------------------------------------------------------------------


def _random_options(rng: np.random.Generator, groups: int) -> list[list[Option]]:
    """Per group: float (most bytes, no harm) and two precisions of fewer bytes and random harm, a
    third of the int8 ones none (a measured gain counts as none), so mixes tie in harm."""
    options = []
    for _ in range(groups):
        size = int(rng.integers(100, 1000))
        int8 = float(rng.exponential(0.3)) if rng.random() > 1 / 3 else 0.0
        options.append(
            [
                Option("float", 4 * size, 0.0),
                Option("int8", size, int8),
                Option("int4", size // 2, float(rng.exponential(1.0))),
            ]
        )
    return options


def _brute_force(options: list[list[Option]]) -> set[tuple[int, float]]:
    """Every mix's (bytes, harm), less those another mix beats in both."""
    mixes = [
        (sum(o.bytes for o in combo), round(sum(o.harm for o in combo), 9))
        for combo in itertools.product(*options)
    ]
    return {
        (b, h) for b, h in mixes if not any(b2 <= b and h2 <= h and (b2, h2) != (b, h) for b2, h2 in mixes)
    }


@pytest.mark.parametrize("seed", range(4))
def test_the_exact_front_is_brute_forces(seed: int) -> None:
    options = _random_options(np.random.default_rng(seed), groups=6)  # 729 mixes
    front = search_front(options, limit=10_000)
    assert front.method == EXACT
    assert {(m.bytes, round(m.harm, 9)) for m in front.mixes} == _brute_force(options)
    for mix in front.mixes:  # each mix's figures are its choices'
        picked = [
            next(o for o in group if o.choice == c) for group, c in zip(options, mix.choices, strict=True)
        ]
        assert mix.bytes == sum(o.bytes for o in picked)
        assert mix.harm == pytest.approx(sum(o.harm for o in picked))


def test_budgets_pick_from_the_front() -> None:
    options = _random_options(np.random.default_rng(7), groups=6)
    front = search_front(options, limit=10_000)
    everything = [
        (sum(o.bytes for o in combo), sum(o.harm for o in combo)) for combo in itertools.product(*options)
    ]
    for max_harm in (0.0, 0.5, 1.5, 100.0):
        mix = smallest_within(front, max_harm)
        assert mix is not None and mix.harm <= max_harm
        assert mix.bytes == min(b for b, h in everything if h <= max_harm + 1e-12)
    smallest, largest = min(b for b, _ in everything), max(b for b, _ in everything)
    for max_bytes in (smallest, (smallest + largest) // 2, largest):
        mix = best_within(front, max_bytes)
        fitting = [h for b, h in everything if b <= max_bytes]
        assert mix is not None and mix.bytes <= max_bytes
        assert mix.harm == pytest.approx(min(fitting))
    assert best_within(front, smallest - 1) is None


def test_a_front_past_its_limit_turns_greedy() -> None:
    options = _random_options(np.random.default_rng(3), groups=6)
    front = search_front(options, limit=5)
    assert front.method == GREEDY
    exact = _brute_force(options)
    smallest = min(exact)
    assert (front.mixes[0].bytes, round(front.mixes[0].harm, 9)) == smallest  # all int4
    assert front.mixes[-1].harm == 0.0  # all float
    bytes_, harms = [m.bytes for m in front.mixes], [m.harm for m in front.mixes]
    assert bytes_ == sorted(bytes_) and harms == sorted(harms, reverse=True)


# --- groups ----------------------------------------------------------------------------------------

LLAMA_LINEARS = [
    f"model.layers.{i}.{p}"
    for i in range(2)
    for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
] + ["lm_head"]


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("linear", {name: 1 for name in LLAMA_LINEARS}),
        ("block", {"block.0": 5, "block.1": 5, "lm_head": 1}),
        (
            "kind",
            {
                **{
                    f"model.layers.*.{p}": 2
                    for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
                },
                "model.layers.*.self_attn.o_proj": 2,
                "model.layers.*.mlp.gate_proj": 2,
                "lm_head": 1,
            },
        ),
    ],
)
def test_groups_by_setting(by: str, expected: dict[str, int]) -> None:
    groups = module_groups(LLAMA_LINEARS, ["model.embed_tokens"], by)
    assert {g.name: len(g.linears) for g in groups[:-1]} == expected
    assert groups[-1].table == "model.embed_tokens" and groups[-1].linears == ()
    assert sorted(m for g in groups for m in g.modules) == sorted([*LLAMA_LINEARS, "model.embed_tokens"])


# --- the mixed recipe ------------------------------------------------------------------------------


def _quant(name: str, **changes: Any) -> dict[str, Any]:
    return {
        **OmegaConf.to_container(compose_config("config", [f"quant={name}"]).quant, resolve=True),
        **changes,
    }


def _mixed(**parts: dict[str, Any]) -> QuantConfig:
    method = next(iter(parts.values()))["method"]
    merged = OmegaConf.merge(
        OmegaConf.structured(QuantConfig), {"api": "mixed", "method": method, "parts": parts}
    )
    return OmegaConf.to_object(merged)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return _llama("sdpa")


def test_a_mixed_recipe_quantizes_each_part_in_its_own_precision(tmp_path: Path) -> None:
    int8 = _quant("ptq_torchao_8da8w", targets={"include": ["*mlp*"], "exclude": []})
    int4 = _quant("ptq_torchao_8da4w", targets={"include": ["*self_attn*"], "exclude": []})
    recipe = make_recipe(_mixed(int8=int8, int4=int4))
    model = _tiny_llama()
    quantized = recipe.converted(recipe.prepare(_tiny_llama()))
    assert recipe.check_converted(quantized) == 14  # 2 x (3 mlp + 4 attention)
    dtypes = {
        name: getattr(module.weight, "target_dtype", None)
        for name, module in quantized.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    assert {n for n, d in dtypes.items() if d == torch.int8} == {n for n in dtypes if ".mlp." in n}
    assert {n for n, d in dtypes.items() if d == torch.int4} == {n for n in dtypes if ".self_attn." in n}
    assert dtypes["lm_head"] is None
    assert str(recipe.target()) == "8da8w+8da4w/cpu/float32"
    inputs = torch.randint(0, 128, (2, 16))
    recipe.save(quantized, tmp_path / "mixed.pt")
    reloaded = recipe.load(tmp_path / "mixed.pt", _tiny_llama)
    with torch.inference_mode():
        assert torch.equal(reloaded(inputs).logits, quantized(inputs).logits)
        assert not torch.equal(quantized(inputs).logits, model(inputs).logits)


@pytest.mark.parametrize(
    ("parts", "refusal"),
    [
        (["ptq_torchao_8da8w"], "two parts or more"),
        (["ptq_static", "ptq_static"], "do not compose"),
        (["ptq_torchao_8da8w", "wo_torchao_int8"], "methods"),
    ],
)
def test_mixes_a_recipe_cannot_make_are_refused(parts: list[str], refusal: str) -> None:
    with pytest.raises(ConfigError, match=refusal):
        _mixed(**{f"part{i}": _quant(name) for i, name in enumerate(parts)})


def test_a_module_in_two_parts_is_refused() -> None:
    recipe = make_recipe(_mixed(a=_quant("ptq_torchao_8da8w"), b=_quant("ptq_torchao_8da4w")))
    with pytest.raises(ConfigError, match=r"both select model\.layers\.0\.self_attn\.q_proj"):
        recipe.prepare(_tiny_llama())


# --- the stage, through the CLI --------------------------------------------------------------------

PLANTED = "model.layers.1.mlp.down_proj"
# llama_tiny at TINY_DECODER's size: 2 blocks x 7 Linears and the LM head, and the token-embedding table.
GROUPS = 16


def _plant_outlier(source: Path, target: Path) -> Path:
    """`source`'s decoder with one weight of PLANTED a thousand times its largest: int8 with one
    scale per weight tensor then spends its whole range on that weight and rounds the others to zero."""
    model = AutoModelForCausalLM.from_pretrained(source)
    weight = model.get_submodule(PLANTED).weight
    with torch.no_grad():
        weight[0, 0] = 1000 * weight.abs().max()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def _job(planted: Path, corpus: Path, folder: Path) -> list[str]:
    """A job on the planted decoder, untrained further (the float model is the planted one)."""
    return [
        *LM_FAST,
        "model=llama_tiny",
        *TINY_DECODER,
        f"data.path={corpus}",
        f"model.name_or_path={planted}",
        "trainer.limit_train_batches=0",
        "logger=none",
        "benchmark=none",
        f"hydra.run.dir='{folder}'",
    ]


def _sensitivity_job(planted: Path, corpus: Path, folder: Path) -> list[str]:
    return [
        *_job(planted, corpus, folder),
        "+quant@sensitivity.precisions.int8=ptq_static",
        "sensitivity.precisions.int8.calibration_batches=4",
        "sensitivity.precisions.int8.weight.observer=minmax",
        "sensitivity.precisions.int8.weight.qscheme=per_tensor_symmetric",
        "sensitivity.groups=linear",
        "sensitivity.examples=64",
        "sensitivity.search.max_ppl_increase=[1.0]",
    ]


@pytest.fixture(scope="module")
def sensitivity_run(
    learned_llama: LearnedDecoder, text_corpus: Path, hf_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A float job on the planted decoder that measures each Linear's (and the table's)
    sensitivity, with the test split's loader refusing every call while the stage runs."""
    from qatflash import pipeline
    from qatflash.cli import main

    root = tmp_path_factory.mktemp("sensitivity")
    planted = _plant_outlier(learned_llama.folder, root / "planted")
    stage = pipeline.sensitivity.run

    def without_test_split(cfg: Any, subject: Any, *args: Any) -> Any:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(subject.data), "test_dataloader", _refuse)
            return stage(cfg, subject, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.sensitivity, "run", without_test_split)
        patch.setattr(
            "sys.argv",
            ["qatflash", f"data.cache_dir={hf_cache}", *_sensitivity_job(planted, text_corpus, root / "job")],
        )
        main()
    return root


def _refuse(*_: Any) -> None:
    raise AssertionError("the sensitivity stage read the test split")


def test_sensitivity_ranks_a_planted_outlier_first(sensitivity_run: Path) -> None:
    job = sensitivity_run / "job"
    record = read_results(job)
    assert record is not None and record["status"] == "ok"
    table = pd.read_csv(job / SENSITIVITY_FILE)
    assert len(table) == GROUPS and set(table["precision"]) == {"int8"}
    assert table.loc[table["group"] == "model.embed_tokens", "modules"].item() == 1
    ranked = table.sort_values("harm", ascending=False)
    first = ranked.iloc[0]
    assert first["group"] == PLANTED
    assert first["harm_low"] > 0  # its perplexity cost is significant on the validation windows
    assert first["harm"] > 10 * max(ranked.iloc[1]["harm"], 0.1)
    assert table.sort_values("kl", ascending=False).iloc[0]["group"] == PLANTED  # the proxy agrees
    assert (table["bytes"] < table["float_bytes"]).all()  # each module's serialized state, overhead included
    assert table["bytes"].sum() < 0.4 * table["float_bytes"].sum()
    section = record["sensitivity"]
    assert section["unit"] == "%" and section["group_count"] == GROUPS
    assert section["search"] == "exact"
    rank = section["proxy_spearman"]  # the proxy's ranking against the measured changes, over the groups
    assert rank["rho"] == pytest.approx(stats.spearmanr(table["kl"], table["harm"]).statistic)
    assert rank["low"] < rank["rho"] < rank["high"]


def test_the_chosen_mix_leaves_the_planted_layer_float_and_runs_from_the_cli(
    sensitivity_run: Path, text_corpus: Path, hf_cache: Path, run_app: Any
) -> None:
    job = sensitivity_run / "job"
    (mix,) = read_results(job)["sensitivity"]["mixes"]
    assert mix["budget"] == "max_ppl_increase" and mix["harm"] <= 1.0
    assert PLANTED in mix["kept_float"]
    config = OmegaConf.load(job / "mixes" / "quant" / f"{mix['quant']}.yaml")
    assert PLANTED not in config.targets.include and config.targets.include
    tables = int(config.embeddings == "int8")
    assert len(config.targets.include) + tables == mix["groups_quantized"]
    code, err = run_app(
        f"data.cache_dir={hf_cache}",
        *_job(sensitivity_run / "planted", text_corpus, sensitivity_run / "mix"),
        f"hydra.searchpath=[file://{job / 'mixes'}]",
        f"quant={mix['quant']}",
    )
    assert code == 0, err
    shipped = read_results(sensitivity_run / "mix")
    assert shipped["status"] == "ok"
    assert shipped["model"]["quantized_modules"] == mix["groups_quantized"]


def test_a_killed_sensitivity_resumes_at_the_group_it_reached(
    sensitivity_run: Path, text_corpus: Path, hf_cache: Path, run_app: Any
) -> None:
    job = sensitivity_run / "resumed"
    shutil.copytree(sensitivity_run / "job", job)
    record = json.loads((job / "results.json").read_text())
    (job / "results.json").write_text(json.dumps({**record, "status": "failed"}))
    table = pd.read_csv(job / SENSITIVITY_FILE)
    kept = table.iloc[:12].assign(kl=-1.0)  # marked: a row measured again would lose the mark
    kept.to_csv(job / SENSITIVITY_FILE, index=False)
    code, err = run_app(
        f"data.cache_dir={hf_cache}", *_sensitivity_job(sensitivity_run / "planted", text_corpus, job)
    )
    assert code == 0, err
    resumed = pd.read_csv(job / SENSITIVITY_FILE)
    assert list(resumed["group"]) == list(table["group"])
    assert (resumed["kl"].iloc[:12] == -1.0).all() and (resumed["kl"].iloc[12:] > 0).all()


def test_the_report_shows_each_group_and_the_groups_each_mix_keeps_float(
    sensitivity_run: Path, tmp_path: Path
) -> None:
    from qatflash.report import write_report

    report = write_report([sensitivity_run / "job"], tmp_path)
    names = {path.name for path in report.files}
    assert {"sensitivity.csv", "mixes.csv", "sensitivity.png", "front.png"} <= names
    rows = pd.read_csv(tmp_path / "sensitivity.csv")
    assert len(rows) == GROUPS and set(rows["params.max_length"]) == {32}
    assert rows.sort_values("harm").iloc[-1]["group"] == PLANTED
    (mix,) = pd.read_csv(tmp_path / "mixes.csv").itertuples()
    assert PLANTED in mix.kept_float.split(", ")
    assert "the groups it keeps float" in (tmp_path / "report.md").read_text()


def test_a_group_is_quantized_alone() -> None:
    """A group's recipe is its precision's with the group's Linears as the only targets, and the
    embedding table only in the table's own group."""
    from qatflash.sensitivity.groups import Group
    from qatflash.sensitivity.measure import group_recipe

    precision = OmegaConf.to_object(compose_config("config", ["quant=ptq_static"]).quant)
    assert precision.embeddings == "int8"
    linears = group_recipe(precision, Group("block.0", ("a.q", "a.k")))
    assert (list(linears.targets.include), linears.targets.exclude, linears.embeddings) == (
        ["a.q", "a.k"],
        [],
        "float",
    )
    assert not linears.targets.skip_edge_blocks
    table = group_recipe(precision, Group("embed", table="embed"))
    assert (list(table.targets.include), table.embeddings) == ([], "int8")
    assert (table.activation, table.weight, table.engine) == (
        precision.activation,
        precision.weight,
        precision.engine,
    )


# --- the pieces between the table and the YAML ------------------------------------------------------


def test_harm_reads_each_statistic_in_its_direction() -> None:
    from qatflash.report.quality import STATISTICS
    from qatflash.report.stats import Interval

    lost = STATISTICS["accuracy"].harm(Interval(-0.02, -0.03, -0.01))  # 2 points lost [1, 3]
    assert (lost.estimate, lost.low, lost.high) == pytest.approx((2.0, 1.0, 3.0))
    worse = STATISTICS["ppl"].harm(Interval(0.01, 0.005, 0.02))  # perplexity 1 % up [0.5, 2]
    assert (worse.estimate, worse.low, worse.high) == pytest.approx((1.0, 0.5, 2.0))


def _table(*rows: tuple[str, str, float]) -> pd.DataFrame:
    """A sensitivity table of (precision, group, harm) rows, 400 float and 100 quantized bytes each."""
    return pd.DataFrame(
        [{"precision": p, "group": g, "harm": h, "float_bytes": 400, "bytes": 100} for p, g, h in rows]
    )


def test_options_count_a_gain_as_none_and_need_every_precision() -> None:
    from qatflash.sensitivity.groups import Group
    from qatflash.sensitivity.mixes import options

    groups = [Group("a", ("a",)), Group("b", ("b",))]
    (a, b) = options(_table(("int8", "a", -0.3), ("int8", "b", 0.2)), groups)
    assert [(o.choice, o.bytes, o.harm) for o in a] == [("float", 400, 0.0), ("int8", 100, 0.0)]
    assert b[1].harm == pytest.approx(0.2)
    with pytest.raises(RuntimeError, match="has \\['int8'\\] for b, not each of \\['int4', 'int8'\\]"):
        options(_table(("int8", "a", 0.1), ("int4", "a", 0.5), ("int8", "b", 0.2)), groups)


def test_a_size_ceiling_searches_by_size() -> None:
    from qatflash.config import SearchConfig
    from qatflash.sensitivity.mixes import budgets, chosen

    assert budgets(SearchConfig(max_ppl_increase=[0.5], max_bytes=[10]), "max_ppl_increase") == [
        ("max_ppl_increase", 0.5),
        ("max_bytes", 10.0),
    ]
    front = search_front(_random_options(np.random.default_rng(5), groups=4), limit=10_000)
    ceiling = front.mixes[len(front.mixes) // 2].bytes
    assert chosen(front, "max_bytes", ceiling) == best_within(front, ceiling)
    assert chosen(front, "max_ppl_increase", 0.5) == smallest_within(front, 0.5)


def test_the_greedy_search_buys_back_the_most_loss_per_byte_first() -> None:
    costly = [Option("float", 400, 0.0), Option("int8", 100, 1.0)]
    cheap = [Option("float", 400, 0.0), Option("int8", 100, 0.1)]
    front = search_front([costly, cheap], limit=1)
    assert front.method == GREEDY
    assert [m.choices for m in front.mixes] == [("int8", "int8"), ("float", "int8"), ("float", "float")]


def test_the_proxy_is_the_kl_from_the_float_model_to_the_quantized_one() -> None:
    from qatflash.sensitivity.measure import mean_kl

    p, q = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])
    expected = float((p * (p / q).log()).sum())  # KL(float || quantized), not the reverse
    assert mean_kl([p.log()], [q.log()]) == pytest.approx(expected)
    assert expected != pytest.approx(float((q * (q / p).log()).sum()))


def test_a_mix_of_two_precisions_loads_as_a_mixed_recipe(tmp_path: Path) -> None:
    from qatflash.sensitivity.groups import Group
    from qatflash.sensitivity.mixes import mix_config, write_mix
    from qatflash.sensitivity.search import Mix

    precisions = {
        name: OmegaConf.to_object(compose_config("config", [f"quant=wo_packed_{name}"]).quant)
        for name in ("int8", "int4")
    }
    groups = [
        Group("block.0", ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj")),
        Group("block.1", ("model.layers.1.mlp.up_proj",)),
        Group("lm_head", ("lm_head",)),
    ]
    config = mix_config(Mix(("int8", "int4", "float"), 0, 0.0), groups, precisions)
    assert config is not None and config["api"] == "mixed" and config["method"] == "ptq_weight_only"
    assert config["parts"]["int8"]["targets"]["include"] == list(groups[0].linears)
    assert config["parts"]["int4"]["targets"]["include"] == list(groups[1].linears)
    write_mix(config, tmp_path / "mix.yaml", "a test mix")
    loaded = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(QuantConfig), OmegaConf.load(tmp_path / "mix.yaml"))
    )
    recipe = make_recipe(loaded)
    quantized = recipe.converted(recipe.prepare(_tiny_llama()))
    assert recipe.check_converted(quantized) == 3
    kinds = {name: type(quantized.get_submodule(name)).__name__ for g in groups for name in g.linears}
    assert kinds["model.layers.0.mlp.up_proj"] != kinds["model.layers.1.mlp.up_proj"] != "Linear"
    assert kinds["lm_head"] == "Linear"
    assert mix_config(Mix(("float", "float", "float"), 0, 0.0), groups, precisions) is None


def test_a_table_group_and_a_one_precision_mix() -> None:
    from qatflash.sensitivity.groups import Group
    from qatflash.sensitivity.mixes import mix_config
    from qatflash.sensitivity.search import Mix

    precision = OmegaConf.to_object(compose_config("config", ["quant=ptq_static"]).quant)
    groups = [Group("a", ("a",)), Group("t", table="t")]
    kept_table = mix_config(Mix(("int8", "float"), 0, 0.0), groups, {"int8": precision})
    assert (kept_table["api"], kept_table["embeddings"], kept_table["targets"]["include"]) == (
        "eager",
        "float",
        ["a"],
    )
    table_only = mix_config(Mix(("float", "int8"), 0, 0.0), groups, {"int8": precision})
    assert (table_only["embeddings"], table_only["targets"]["include"]) == ("int8", [])


@pytest.mark.parametrize(
    ("precisions", "tied", "refusal"),
    [
        (["ptq_static", "ptq_static"], False, "do not compose"),
        (["ptq_static"], True, "an LM head tied to the embedding table"),
    ],
)
def test_mixes_that_could_not_ship_are_refused_before_any_data(
    precisions: list[str], tied: bool, refusal: str
) -> None:
    from qatflash.sensitivity.measure import candidates

    configs = {
        f"p{i}": OmegaConf.to_object(compose_config("config", [f"quant={name}"]).quant)
        for i, name in enumerate(precisions)
    }
    model = _tiny_llama()
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    with pytest.raises(ConfigError, match=refusal):
        candidates(configs, model)


def test_the_tables_reach_wandb_as_tables(sensitivity_run: Path, tmp_path: Path) -> None:
    """Tracker.table: the sensitivity CSV as a W&B table of the same columns and rows (offline run)."""
    from qatflash.config import LoggerConfig
    from qatflash.tracking import Tracker

    table = pd.read_csv(sensitivity_run / "job" / SENSITIVITY_FILE)
    with Tracker(LoggerConfig(), tmp_path, "sensitivity", "test", "train", {}) as tracker:
        tracker.table("sensitivity/sensitivity", sensitivity_run / "job" / SENSITIVITY_FILE)
    assert not tracker.warnings
    (logged,) = tmp_path.rglob("media/table/sensitivity/sensitivity_*.table.json")
    written = json.loads(logged.read_text())
    assert written["columns"] == list(table.columns)
    assert len(written["data"]) == len(table) == GROUPS
    assert [row[written["columns"].index("group")] for row in written["data"]] == list(table["group"])
