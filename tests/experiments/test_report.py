"""experiments.report builds docs/results.md from result JSON: the tests check its structured
rows (numbers over seeds) and the verdict of every finding, not its sentences."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from experiments import report, sweep
from experiments.report import load, render, render_verdicts, tables, verdicts
from experiments.report.load import Sources
from experiments.report.verdicts import Verdict

DOCS = Path(__file__).resolve().parents[2] / "docs"


def fake_result(model: str, accuracies: list[float], seed: int) -> dict:
    slices = [
        {"seq_len": 64, "num_kv_pairs": k, "accuracy": a}
        for k, a in zip((4, 8, 12, 16), accuracies, strict=True)
    ]
    # beyond the training setting: accuracy falls with length and pairs, less so with MC
    keep = 0.8 if "+" in model or model == "Transformer++" else 0.5
    grid = [
        {"seq_len": n, "num_kv_pairs": k, "accuracy": accuracies[0] * keep ** (n // 128 + k // 16)}
        for n in (64, 128, 256)
        for k in (8, 16, 24, 31)
        if 4 * k <= n
    ]
    evals = {" ".join(sweep.MQAR_GRID): {"slices": grid}}
    if "+" not in model and model != "Transformer++":
        post = [{**p, "accuracy": p["accuracy"] * 2} for p in grid]
        evals[" ".join(sweep.MQAR_POST_TRAINING_MC)] = {"slices": post}
    return {
        "model": model,
        "seed": seed,
        "steps": 1600,
        "tokens_per_s": 1000.0,
        "eval": {"accuracy": sum(accuracies) / 4, "slices": slices},
        "evals": evals,
    }


def fake_lm_result(model: str, bits_per_byte: float, seed: int) -> dict:
    return {
        "model": model,
        "seed": seed,
        "steps": 300,
        "tokens_per_s": 500.0,
        "eval": {"bits_per_byte": bits_per_byte, "perplexity": 2**bits_per_byte},
        "evals": {},
    }


def write_result(root: Path, experiment: str, result: dict) -> None:
    path = root / "results" / "experiments" / experiment / sweep.slug(result["model"])
    path.mkdir(parents=True, exist_ok=True)
    (path / f"seed{result['seed']}.json").write_text(json.dumps(result))


MQAR_ACCURACIES = {
    "Transformer++": [0.9, 0.9, 0.8, 0.7],
    "gated_delta": [0.1, 0.1, 0.1, 0.1],
    "gated_delta+residual": [0.2, 0.2, 0.1, 0.1],
    "gated_delta+grm": [0.6, 0.5, 0.4, 0.3],
    "gated_delta+ssc": [0.5, 0.4, 0.3, 0.2],
    "swla": [0.95, 0.95, 0.95, 0.95],
    "swla+grm": [0.9, 0.9, 0.9, 0.9],
    "titans": [0.03, 0.03, 0.03, 0.03],
    "titans+grm": [0.05, 0.04, 0.03, 0.03],
}


@pytest.fixture
def src(tmp_path) -> Sources:
    """MQAR results of two seeds (0.01 apart) and a third of the base model only; LM results
    with a seed the variants lack."""
    for model, acc in MQAR_ACCURACIES.items():
        for seed in (0, 1):
            write_result(tmp_path, "mqar", fake_result(model, [a + 0.01 * seed for a in acc], seed))
    write_result(tmp_path, "mqar", fake_result("gated_delta", [0.0] * 4, 2))
    for model, bpb in (
        ("gated_delta", 2.5),
        ("gated_delta+grm", 2.25),
        ("gated_delta+grm, segment 32", 2.0),
    ):
        write_result(tmp_path, "lm", fake_lm_result(model, bpb, 0))
    write_result(tmp_path, "lm", fake_lm_result("gated_delta", 2.0, 1))
    return Sources(tmp_path)


def by_model(rows, model, post_training=None):
    return next(r for r in rows if r.model == model and r.post_training == post_training)


def test_mqar_rows_are_means_over_seeds_with_crossings(src):
    runs = src.experiment("mqar")
    rows = tables.mqar_rows(runs, [4, 8, 12, 16], trained_pairs=8)
    grm = by_model(rows, "gated_delta+grm")
    assert (grm.seeds, grm.crossed) == (2, 2)  # both seeds reach 0.5 at 8 pairs
    assert grm.pairs[0].values == pytest.approx((0.6, 0.61))
    assert grm.pairs[0].std == pytest.approx(0.00707, abs=1e-5)
    assert grm.tokens_per_s == 1000.0
    base = by_model(rows, "gated_delta")
    assert (base.seeds, base.crossed) == (3, 0)
    assert base.overall.mean == pytest.approx(0.07)
    assert by_model(rows, "gated_delta+ssc").crossed == 0  # 0.40 and 0.41 at 8 pairs
    # the mqar grid's post-training MC is not on the test slices: no row here
    assert not any(r.post_training for r in rows)
    assert tables.best_mc(runs) == {"gated_delta+grm", "swla+grm", "titans+grm"}
    # the sweep's MQAR models without a result
    assert load.missing_models("mqar", runs)[:3] == ["swla+residual", "swla+ssc", "titans+residual"]


def test_claims_1_to_3_on_the_training_setting(src):
    scores = tables.mqar_seed_scores(src.experiment("mqar"))
    claims = verdicts.claims_1_to_3([("at 64 tokens", scores)])
    lift = {f.base: f for f in claims[1]}
    # a family is compared on the seeds all its models have: gated_delta's seed 2 is left out
    assert lift["gated_delta"].seeds == (0, 1)
    assert lift["gated_delta"].base_score == pytest.approx(0.105)
    assert (lift["gated_delta"].best, lift["gated_delta"].verdict) == (
        "gated_delta+grm",
        Verdict.PARTLY,
    )
    assert lift["gated_delta"].best_score == pytest.approx(0.455)
    assert lift["gated_delta"].transformer == pytest.approx(0.830)
    assert lift["gated_delta"].closed == pytest.approx(0.35 / 0.725)
    # swla already recalls 0.955: MC has nothing to lift
    assert (lift["swla"].verdict, lift["swla"].easy) == (Verdict.NOT_REPRODUCED, True)
    assert not lift["gated_delta"].easy
    # no titans model left chance: every claim says not testable
    for claim in (1, 2, 3):
        titans = next(f for f in claims[claim] if f.base == "titans")
        assert isinstance(titans, verdicts.NoLearner)
        assert titans.verdict is Verdict.NOT_TESTABLE
    gate = next(f for f in claims[2] if f.base == "gated_delta")
    assert (gate.grm, gate.residual, gate.verdict) == (
        pytest.approx(0.455),
        pytest.approx(0.155),
        Verdict.REPRODUCED,
    )
    keep = next(f for f in claims[3] if f.base == "gated_delta")
    assert keep.kept == pytest.approx((0.355 - 0.105) / (0.455 - 0.105))
    assert keep.verdict is Verdict.REPRODUCED


def test_ssc_above_grm_keeps_more_than_all_of_its_gain():
    per_seed = {"swla": {0: 0.3}, "swla+grm": {0: 0.4}, "swla+ssc": {0: 0.9}}
    (keep,) = verdicts.claims_1_to_3([("at 64 tokens", per_seed)])[3]
    assert keep.kept == pytest.approx(6.0)
    assert keep.verdict is Verdict.REPRODUCED
    assert "ssc beats grm" in render_verdicts.finding(keep)  # not "keeps 600% of grm's gain"


def test_grm_without_gain_leaves_claim_3_untestable():
    per_seed = {"swla": {0: 0.5}, "swla+grm": {0: 0.5}, "swla+ssc": {0: 0.9}}
    (keep,) = verdicts.claims_1_to_3([("at 64 tokens", per_seed)])[3]
    assert (keep.kept, keep.verdict) == (None, Verdict.NOT_TESTABLE)


def test_mqar_grid_tables_and_verdicts_under_load(src):
    grid = load.mqar_grid(src.experiment("mqar"))
    assert "gated_delta, post-training MC" in grid and "swla+grm, post-training MC" not in grid
    extrapolation, memory_load = tables.grid_tables(grid)
    assert extrapolation.columns == ((64, 16), (128, 16), (256, 16))
    assert memory_load.columns == ((256, 8), (256, 16), (256, 24), (256, 31))
    _, seeds, cells = next(r for r in extrapolation.rows if r[0] == "gated_delta")
    assert seeds == 3
    assert cells[0].mean == pytest.approx(0.07 * 0.5)  # 64 tokens, 16 pairs: one halving
    # claims 1-3 also judged under the heaviest memory load: the longest length's pairs
    ((where, scores),) = verdicts.load_view(grid)
    assert where == "at 256 tokens, 8-31 pairs"
    lift = next(f for f in verdicts.claims_1_to_3([(where, scores)])[1] if f.base == "gated_delta")
    assert lift.base_score == pytest.approx(0.016, abs=5e-4)
    assert (lift.best, lift.best_score) == ("gated_delta+grm", pytest.approx(0.329, abs=5e-4))
    # claim 4 at 256 tokens and 31 pairs, on the seeds the family shares
    found = {f.base: f for f in verdicts.mqar_extrapolation(grid)}
    assert (found["gated_delta"].length, found["gated_delta"].pairs) == (256, 31)
    assert found["gated_delta"].seeds == (0, 1)
    assert found["gated_delta"].base_score == pytest.approx(0.013, abs=5e-4)
    model, score, verdict = found["gated_delta"].trained
    assert (model, verdict) == ("gated_delta+grm", Verdict.REPRODUCED)
    assert score == pytest.approx(0.310, abs=5e-4)
    post, verdict = found["gated_delta"].post_training
    assert (post, verdict) == (pytest.approx(0.026, abs=5e-4), Verdict.NOT_REPRODUCED)
    assert isinstance(found["titans"], verdicts.NoLearner)


def test_lm_rows_and_claim(src):
    runs = src.experiment("lm")
    rows = {r.model: r for r in tables.lm_rows(runs)}
    grm = rows["gated_delta+grm"]
    assert (grm.seeds, grm.bits_per_byte.mean, grm.tokens_per_s) == (1, 2.25, 500.0)
    assert grm.perplexity.mean == pytest.approx(2**2.25)
    assert rows["gated_delta"].bits_per_byte.mean == pytest.approx(2.25)  # the table: both seeds
    assert rows["gated_delta"].bits_per_byte.std == pytest.approx(0.354, abs=5e-4)
    assert rows["gated_delta+grm, segment 32"].ablation and not grm.ablation
    families, transformer = verdicts.lm_claim(tables.lm_seed_bits(runs))
    (family,) = families
    # the verdict compares the family on seed 0, the one seed its models share
    assert (family.base_bits, family.seeds, family.verdict) == (2.5, (0,), Verdict.REPRODUCED)
    assert family.variants == (("gated_delta+grm", 2.25),)
    assert transformer is None


def test_cost_rows_sum_training_minutes(src):
    # 1600 steps x 32 x 64 tokens at 1000 tokens/s: 54.6 minutes a cell, 19 cells
    row = tables.cost_row("mqar", src.experiment("mqar"))
    assert (row.models, row.seeds, row.longest_cell) == (9, 3, "Transformer++")
    assert row.cell_minutes == pytest.approx(1038, abs=0.5)
    assert (round(row.wall_minutes), round(row.seed_minutes)) == (519, 173)
    assert round(row.longest_minutes) == 55  # Transformer++ trains 5000 steps at 1000 tokens/s
    assert row.over_budget


def test_report_writes_every_section_and_the_plot(src):
    assert report.main(src.root) == 0
    text = (src.docs / "results.md").read_text()
    assert "| gated_delta+grm | 2 | 2 | 0.605 ± 0.007 |" in text
    assert (src.img / "mqar_recall.png").stat().st_size > 0
    # sections without data say how to run them; the verdicts say what is missing
    assert "`python -m experiments.sweep niah`" in text
    assert "**5. MC training throughput" in text and "not measured yet" in text
    # every note the report can link to exists in the repository's docs/
    for note in render.NOTES.values():
        assert (DOCS / note).is_file(), note
    linked = re.findall(r"\]\((notes/[^)]+)\)", text)
    assert set(linked) == {render.NOTES[k] for k in ("mqar", "cost", "reading")}


def test_small_state_rows_and_verdicts(tmp_path):
    for model, acc in (
        ("Transformer++", [1.0, 1.0, 1.0, 0.9]),
        ("gated_delta", [0.5, 0.3, 0.2, 0.1]),
        ("gated_delta+residual", [0.6, 0.4, 0.3, 0.2]),
        ("gated_delta+grm", [0.9, 0.8, 0.7, 0.6]),
    ):
        for seed in (0, 1):
            result = fake_result(model, acc, seed)
            result["evals"] = {}
            if model == "gated_delta":
                post = [{**s, "accuracy": s["accuracy"] + 0.1} for s in result["eval"]["slices"]]
                result["evals"]["--post-training-mc 8"] = {"accuracy": 0.375, "slices": post}
            write_result(tmp_path, "mqar_small_state", result)
    src = Sources(tmp_path)
    runs = src.experiment("mqar_small_state")
    setting = load.mqar_setting("mqar_small_state")
    assert (setting.num_kv_pairs, setting.heads, setting.head_dim) == (16, 16, 8)
    rows = tables.mqar_rows(runs, [4, 8, 12, 16], setting.num_kv_pairs)
    # trained with 16 pairs: the crossed column reads the 16-pair slice (0.6 for grm)
    assert by_model(rows, "gated_delta+grm").crossed == 2
    assert by_model(rows, "gated_delta").crossed == 0
    post = by_model(rows, "gated_delta", "--post-training-mc 8")
    assert [s.mean for s in post.pairs] == pytest.approx([0.6, 0.4, 0.3, 0.2])
    assert (post.seeds, post.overall.mean, post.tokens_per_s) == (2, 0.375, None)
    assert report.main(tmp_path) == 0
    assert (src.img / "mqar_small_state_recall.png").stat().st_size > 0
    view = ("at 64 tokens, 8-dimensional heads, 16 pairs", tables.mqar_seed_scores(runs))
    claims = verdicts.claims_1_to_3([view])
    (lift,) = claims[1]
    assert (lift.base_score, lift.best) == (0.275, "gated_delta+grm")
    assert lift.best_score == pytest.approx(0.75)
    assert lift.verdict is Verdict.REPRODUCED  # closes 0.475 / 0.7 of the gap
    assert claims[2][0].verdict is Verdict.REPRODUCED  # grm 0.750 vs residual 0.375
    assert load.missing_models("mqar_small_state", runs) == ["gated_delta+ssc"]


def test_every_sweep_cell_has_a_distinct_result_path():
    for name, cells in sweep.EXPERIMENTS.items():
        paths = [sweep.result_path(name, c, 0) for c in cells()]
        assert len(set(paths)) == len(paths), name


def fake_niah_result(model: str, accuracy: float, seed: int = 0, evals=()) -> dict:
    lengths = [
        {"length": n, "accuracy": accuracy, "token_accuracy": min(1.0, 0.25 + 4 * accuracy)}
        for n in (512, 1024)
    ]
    return {
        "model": model,
        "seed": seed,
        "final_loss": 2.0 - accuracy,
        "steps": 2000,
        "tokens_per_s": 8192.0,
        "eval": {"lengths": lengths},
        "evals": {name: {"lengths": lengths} for name in evals},
    }


POST = "gated_delta, --post-training-mc 256"


def niah_results(tpp: float, base: float, grm: float) -> dict[str, list[dict]]:
    """Seed 0 of three models, and a seed 1 only gated_delta+grm has (left out of claim 4)."""
    return {
        "Transformer++": [fake_niah_result("Transformer++", tpp)],
        "gated_delta": [fake_niah_result("gated_delta", base, evals=("--post-training-mc 256",))],
        "gated_delta+grm": [
            fake_niah_result("gated_delta+grm", grm),
            fake_niah_result("gated_delta+grm", 0.9, seed=1),
        ],
    }


@pytest.mark.parametrize(
    ("tpp", "base", "grm", "metric", "verdict", "learned"),
    [
        (0.0, 0.0, 0.0, "answer-token accuracy", Verdict.INCONCLUSIVE, ()),
        (0.6, 0.0, 0.0, "exact match", Verdict.NOT_TESTABLE, ("Transformer++",)),
        (0.6, 0.0, 0.5, "exact match", Verdict.PARTLY, ("Transformer++", "gated_delta+grm")),
        # the base learned: MC compared with it, each with a verdict of its own
        (
            0.6,
            0.4,
            0.5,
            "exact match",
            None,
            ("Transformer++", "gated_delta", POST, "gated_delta+grm"),
        ),
        # no exact match of 0.1: answer-token accuracy decides (0.25 + 4 x exact in the fakes)
        (0.09, 0.0, 0.0, "answer-token accuracy", Verdict.NOT_TESTABLE, ("Transformer++",)),
    ],
)
def test_niah_claim_4(tpp, base, grm, metric, verdict, learned):
    finding = verdicts.niah_extrapolation(niah_results(tpp, base, grm))
    assert (finding.metric, finding.verdict, finding.learned) == (metric, verdict, learned)
    assert (finding.seeds, finding.first, finding.last, finding.base) == (
        (0,),
        512,
        1024,
        "gated_delta",
    )
    if verdict is None:
        assert finding.comparisons == (
            (POST, 0.4, Verdict.NOT_REPRODUCED),
            ("gated_delta+grm", 0.5, Verdict.REPRODUCED),
        )
    if verdict is Verdict.PARTLY:
        assert finding.kept == pytest.approx(1.0)
    if verdict is Verdict.NOT_TESTABLE and metric == "exact match":
        assert finding.best == "gated_delta"  # the best recurrent model
    assert verdict is None or verdict.value in render_verdicts.finding(finding)


def test_niah_tables_per_length(tmp_path):
    for results in niah_results(0.6, 0.0, 0.5).values():
        for result in results:
            write_result(tmp_path, "niah", result)
    niah = Sources(tmp_path).experiment("niah")
    found = tables.niah_tables(niah)
    assert found.lengths == (512, 1024)
    exact = {label: (seeds, cells) for label, seeds, cells in found.exact}
    assert exact["gated_delta+grm"][0] == 2  # the table keeps every seed
    assert exact["gated_delta+grm"][1][0].mean == pytest.approx(0.7)
    assert exact["gated_delta, --post-training-mc 256"][1][1].mean == 0.0
    tokens = {label: cells for label, _, cells in found.tokens}
    assert tokens["Transformer++"][0].mean == pytest.approx(1.0)
    assert dict(found.final_loss)["gated_delta"].mean == 2.0
    # 2000 steps of 16 x 512 tokens at 8192 tokens/s: 33.3 minutes a cell
    assert found.minutes == pytest.approx((2000 * 16 * 512 / 8192 / 60,) * 4)
    assert report.main(tmp_path) == 0


def test_throughput_claim_needs_every_mc_model_between_its_base_and_the_transformer():
    def row(speeds):
        return {"T": 16384, "models": {m: {"tokens_per_s": s} for m, s in speeds.items()}}

    speeds = {"transformer++": 300.0, "gated_delta": 900.0, "gated_delta+grm": 500.0}
    speeds |= {"gated_delta+ssc": 600.0, "titans": 400.0, "titans+grm": 120.0}
    # the verdict reads the longest length, the last row
    data = {"rows": [row({"transformer++": 1.0}), row(speeds)]}
    found = verdicts.throughput(data)
    assert (found.length, found.transformer) == (16384, 300.0)
    assert found.items == (
        ("gated_delta+grm", 500.0, 900.0, True),
        ("gated_delta+ssc", 600.0, 900.0, True),
        ("titans+grm", 120.0, 400.0, False),
    )
    assert found.verdict is Verdict.PARTLY
    assert verdicts.throughput(None) is None


def test_op_benchmarks_as_ratio_tables():
    rows = [
        {"T": 4096, "sdpa_s": 0.3, "rules": {"linear": {"ratio_vs_sdpa": 0.2}}},
        {"T": 8192, "sdpa_s": 1.0, "rules": {"linear": {"ratio_vs_sdpa": 0.1}, "swla": {}}},
    ]
    bench = tables.ratio_table(rows, "T", "sdpa_s", "rules", "ratio_vs_sdpa")
    assert bench.columns == ("sdpa_s", "linear")
    assert bench.rows == ((4096, (0.3, 0.2)), (8192, (1.0, 0.1)))
