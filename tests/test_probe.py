"""growmem.probe: the capacity probe's numbers are exact where they can be derived (orthonormal
keys, one segment, hard gates), its gated reads are memory_caching's, and its files and errors
are what the docs say."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from growmem.layers.config import DEFAULT_GATE_TEMPERATURE
from growmem.ops.spec import DEFAULT_GATE_NORM, Caching
from growmem.probe import (
    Gates,
    Layout,
    capacity_probe,
    draw_keys,
    gate_setting,
    gated_mix,
    probe_reads,
    recalled,
    series_name,
)
from growmem.probe import command as probe

DTYPE = torch.float64
# the series of the library's default gates with normalize_summaries: the centred variant
# only where the default geometry is not centred already
DEFAULT_SERIES = (
    ["grm", "ssc"] if DEFAULT_GATE_NORM == "centered" else ["grm", "grm norm", "ssc", "ssc norm"]
)


def draw(P, D, C, *, keys="random", filler=0, draws=3, seed=0, **settings):
    """A layout, keys, values and probe_reads' result for P pairs at head size D, segment C."""
    layout = Layout(P, filler, C)
    gen = torch.Generator().manual_seed(seed)
    k = draw_keys(layout, D, draws, keys, gen)
    v = F.normalize(torch.randn(draws, P, D, generator=gen, dtype=DTYPE), dim=-1)
    return layout, k, v, probe_reads(k, v, layout, gen=gen, **settings)


def series(payload, name):
    return next(e for e in payload["series"] if e["name"] == name)


def test_same_seed_same_numbers_and_one_p_does_not_depend_on_the_others():
    settings = dict(
        head_dim=8, segment_size=4, draws=3, filler=1, gate_scales=["default", "raw"],
        normalize_summaries=True,
    )  # fmt: skip
    first = capacity_probe(pairs=[4, 16], seed=3, **settings)
    assert first == capacity_probe(pairs=[4, 16], seed=3, **settings)
    assert first != capacity_probe(pairs=[4, 16], seed=4, **settings)
    alone = capacity_probe(pairs=[16], seed=3, **settings)
    for entry in alone["series"]:
        assert entry["per_draw"][0] == series(first, entry["name"])["per_draw"][1]


@pytest.mark.parametrize("rule", ["gated_delta", "delta", "linear"])
def test_orthonormal_keys_up_to_the_head_size_are_all_recalled(rule):
    # P <= D orthonormal keys: S k_j = v_j exactly for the delta rule (beta = 1) and the
    # linear rule, whatever the segments
    payload = capacity_probe(
        head_dim=8, segment_size=3, pairs=[1, 5, 8], draws=4, rule=rule, keys="orthogonal"
    )
    assert payload["segments"] == [1, 2, 3]
    for name in ("base", "oracle"):
        assert series(payload, name)["recall"] == [1.0, 1.0, 1.0]


def test_layout_places_pairs_and_filler():
    layout = Layout(pairs=5, filler=2, segment_size=4)  # pairs at tokens 0, 3, 6, 9, 12
    assert layout.writes == 15 and layout.num_segments == 4
    assert layout.segment_of_pair().tolist() == [0, 0, 1, 2, 3]
    assert layout.lengths() == [4, 4, 4, 3 + 5]  # the 5 queries extend the last segment


def test_recall_is_the_nearest_value_and_a_zero_read_recalls_nothing():
    values = torch.eye(3, dtype=DTYPE)[None]  # [1, 3, 3]
    # a zero read would tie every value and argmax would pick value 0, its own
    reads = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, 1.0, 0.5]]], dtype=DTYPE)
    assert recalled(reads, values).tolist() == [[False, True, False]]


@pytest.mark.parametrize(("init", "filler"), [("continuous", 0), ("independent", 0),
                                              ("continuous", 1)])  # fmt: skip
def test_oracle_recalls_every_pair_when_each_segment_holds_orthonormal_keys(init, filler):
    # 8 dims, 4 (2 with filler) pairs a segment, blocks of 8 orthonormal keys: within a
    # segment the delta rule stores each pair exactly and later keys of the segment do not
    # disturb it
    layout, _k, v, out = draw(
        32, 8, 4, keys="orthogonal", filler=filler, draws=4, rule="delta", init=init
    )
    assert recalled(out["reads"]["oracle"], v).all()
    assert not recalled(out["reads"]["base"], v).all()  # 32 pairs overflow the 8-dim state
    # continuous: the online memory at the end is base's, so the last segment's pairs read
    # the same
    last = layout.segment_of_pair() == layout.num_segments - 1
    if init == "continuous":
        torch.testing.assert_close(
            out["reads"]["oracle"][:, last], out["reads"]["base"][:, last], rtol=0, atol=1e-12
        )


def test_oracle_is_at_least_base_on_the_default_grid():
    payload = capacity_probe(head_dim=8, segment_size=8, pairs=[4, 8, 16, 32, 64], draws=4)
    base, oracle = series(payload, "base")["recall"], series(payload, "oracle")["recall"]
    assert all(o >= b for o, b in zip(oracle, base, strict=True))
    assert oracle[-1] >= 2 * base[-1]  # 8 segments of 8 pairs: the headroom the probe shows
    assert base[:2] == oracle[:2]  # one segment: the oracle's memory is base's


def test_default_gates_are_the_library_s():
    """ "default" is the library's default parameterisation: Caching()'s geometry and scale,
    and the layer's initial temperature as the op's temperature input; the named scales are
    dot-product gates."""
    library = Caching()
    assert gate_setting("default", 8) == Gates(
        "default", library.gate_norm, library.gate_scale_for(8), DEFAULT_GATE_TEMPERATURE
    )
    assert gate_setting("default", 8).factor == library.gate_scale_for(8) * DEFAULT_GATE_TEMPERATURE
    assert gate_setting("invsqrtD", 16) == Gates("invsqrtD", "none", 0.25)
    assert gate_setting("raw", 16) == Gates("raw", "none", 1.0)
    assert gate_setting("sqrtD", 16) == Gates("sqrtD", "none", 4.0)
    assert gate_setting(0.5, 16) == Gates("0.5", "none", 0.5)


@pytest.mark.parametrize("filler", [0, 2])
def test_one_segment_makes_every_variant_base(filler):
    P = 6
    _, _, _v, out = draw(
        P, 4, P * (1 + filler), filler=filler, gate_scales=("default", 0.5, 1e3),
        normalize_summaries=True,
    )  # fmt: skip
    assert len(out["reads"]) == 3 + 2 * 2 * 2 + len(DEFAULT_SERIES)
    for name, reads in out["reads"].items():
        torch.testing.assert_close(reads, out["reads"]["base"], rtol=0, atol=1e-12, msg=name)


def test_sharp_gates_with_the_key_as_gate_query_read_the_holding_segment():
    # With gate scale 1e6 the softmax is one-hot on the largest logit <k_j, c_i>: where that
    # is the segment holding pair j, grm reads exactly what the oracle reads, so grm recalls
    # at least the oracle's pairs minus those routed elsewhere.
    layout, _, v, out = draw(64, 16, 16, draws=6, gate_scales=(1e6,))
    name = "grm s=1e+06"
    holder = layout.segment_of_pair()
    gamma = out["gates"][name]  # [B, P, N]
    routed = gamma[:, torch.arange(64), holder] > 1 - 1e-9  # [B, P]
    assert routed.any() and not routed.all()
    grm, oracle = out["reads"][name], out["reads"]["oracle"]
    torch.testing.assert_close(grm[routed], oracle[routed], rtol=0, atol=1e-6)
    missed = (~routed).sum(-1)
    assert (recalled(grm, v).sum(-1) >= recalled(oracle, v).sum(-1) - missed).all()

    # orthonormal keys, 4 segments of 4: <k_j, c_i> is 1/4 on the holder and 0 elsewhere,
    # so every query is routed
    layout, _, v, out = draw(16, 16, 4, keys="orthogonal", gate_scales=(1e3,))
    gamma = out["gates"]["grm s=1000"]
    torch.testing.assert_close(
        gamma, F.one_hot(layout.segment_of_pair(), 4).to(DTYPE).expand_as(gamma), rtol=0,
        atol=1e-12,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("rule", "init", "summary", "filler"),
    [
        ("gated_delta", "continuous", "mean", 0),
        ("delta", "independent", "mean", 1),
        ("linear", "continuous", "sum", 2),
        ("gated_delta", "independent", "sum", 0),
    ],
)
def test_reads_are_memory_caching_s_and_follow_the_design_formulas(rule, init, summary, filler):
    # The probe's grm, ssc and uniform come from memory_caching; they must equal the formulas
    # of docs/design.md §3.3 applied to linear_memory's segment states and the probe's own
    # summaries, in each geometry: a change in the library's gates, or query tokens that
    # disturbed the memory or the online summary, would show here. gated_mix (the gate
    # weights of the diagnostics) is the same formula.
    scales = ("default", 0.25, 3.0)
    layout, _k, _v, out = draw(
        37, 8, 5, filler=filler, rule=rule, init=init, summary=summary, top_k=2,
        gate_scales=scales, normalize_summaries=True,
    )  # fmt: skip
    n = layout.num_segments
    assert n > 3  # ssc selects among more caches than top_k
    segment_reads = out["segment_reads"]  # [B, P, N, D]
    if init == "continuous":  # the online memory at the end is base's
        torch.testing.assert_close(
            out["reads"]["base"], segment_reads[..., -1, :], rtol=0, atol=1e-12
        )
    torch.testing.assert_close(out["reads"]["uniform"], segment_reads.mean(-2), rtol=0, atol=1e-12)
    checked = 0
    for gates in (gate_setting(x, 8) for x in scales):
        variants = [(gates, False), (dataclasses.replace(gates, gate_norm="centered"), True)]
        for setting, normalized in variants:
            if normalized and gates.gate_norm == "centered":
                continue  # the default gates centred already: no variant of their own
            r = setting.factor * out["logits"][setting.gate_norm]
            for aggregation in ("grm", "ssc"):
                name = series_name(aggregation, setting, normalized)
                weights = torch.softmax(_topk_mask(r, aggregation), -1)
                expected = torch.einsum("bpn,bpnd->bpd", weights, segment_reads)
                torch.testing.assert_close(out["reads"][name], expected, rtol=0, atol=1e-12)
                mixed, _ = gated_mix(segment_reads, r, aggregation, top_k=2)
                torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-12)
                checked += 1
    assert checked == len(out["reads"]) - 3  # every gated series


def _topk_mask(r, aggregation):
    """The logits ssc keeps (top 2 cached by value, and the online one), -inf elsewhere."""
    if aggregation == "grm":
        return r
    kept = r.clone()
    cached = r[..., :-1]
    second = cached.topk(2, dim=-1).values[..., -1:]
    kept[..., :-1] = cached.masked_fill(cached < second, -math.inf)
    return kept


def test_summaries_are_the_segments_key_means():
    _layout, k, _, out = draw(10, 4, 4)
    means = torch.stack([k[:, 0:4].mean(1), k[:, 4:8].mean(1), k[:, 8:10].mean(1)], 1)
    logits = {
        "none": torch.einsum("bpd,bnd->bpn", k, means),
        "l2": torch.einsum("bpd,bnd->bpn", k, F.normalize(means, dim=-1)),
        "centered": torch.einsum(
            "bpd,bnd->bpn", k, F.normalize(means - means.mean(1, keepdim=True), dim=-1)
        ),
    }
    assert out["logits"].keys() == logits.keys()
    for norm, expected in logits.items():
        torch.testing.assert_close(out["logits"][norm], expected, rtol=0, atol=1e-14, msg=norm)


@pytest.mark.parametrize("init", ["continuous", "independent"])
def test_base_is_the_plain_delta_rule(init):
    # base against a literal delta rule loop, S <- S + (v - S k) k^T, whatever the caches do
    _, k, v, out = draw(20, 6, 4, rule="delta", init=init)
    S = torch.zeros(k.shape[0], 6, 6, dtype=DTYPE)
    for j in range(20):
        kj, vj = k[:, j], v[:, j]
        S = S + torch.einsum("bv,bk->bvk", vj - torch.einsum("bvk,bk->bv", S, kj), kj)
    torch.testing.assert_close(
        out["reads"]["base"], torch.einsum("bvk,bpk->bpv", S, k), rtol=0, atol=1e-12
    )


def test_command_writes_json_and_png(tmp_path, capsys):
    args = [
        "capacity", "--head-dim", "8", "--segment-size", "4", "--pairs", "4", "16",
        "--draws", "2", "--gate-scale", "default", "raw", "--normalize-summaries",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert probe.main(args) == 0
    out = capsys.readouterr().out
    assert "| P | segments | base | uniform | oracle |" in out
    stem = tmp_path / "capacity_gated_delta_continuous_d8_seg4"
    png = stem.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    payload = json.loads(stem.with_suffix(".json").read_text())
    assert set(payload) == {"provenance", "probe", "settings", "pairs", "segments", "series",
                            "seconds"}  # fmt: skip
    assert {"versions", "git", "python"} <= set(payload["provenance"])
    assert payload["pairs"] == [4, 16] and payload["segments"] == [1, 4]
    assert payload["settings"]["gate_scales"] == {
        "default": {
            "gate_norm": DEFAULT_GATE_NORM,
            "gate_scale": Caching().gate_scale_for(8),
            "temperature": DEFAULT_GATE_TEMPERATURE,
        },
        "raw": {"gate_norm": "none", "gate_scale": 1.0, "temperature": None},
    }
    names = [e["name"] for e in payload["series"]]
    assert names == [
        "base", "uniform", "oracle", *DEFAULT_SERIES, "grm s=1", "grm norm s=1", "ssc s=1",
        "ssc norm s=1",
    ]  # fmt: skip
    for entry in payload["series"]:
        assert len(entry["recall"]) == len(entry["sem"]) == 2
        for mean, draws in zip(entry["recall"], entry["per_draw"], strict=True):
            assert len(draws) == 2 and mean == pytest.approx(sum(draws) / 2, abs=1e-15)
            assert all(0 <= x <= 1 for x in draws)
        gated = "gate_scale" in entry
        assert gated == ("gate_on_holder" in entry) == ("top_gate_on_holder" in entry)
    assert payload == {**payload, **capacity_probe(
        head_dim=8, segment_size=4, pairs=[4, 16], draws=2, gate_scales=["default", "raw"],
        normalize_summaries=True,
    )}  # fmt: skip


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (dict(pairs=[4, 0]), "pairs"),
        (dict(pairs=[]), "pairs"),
        (dict(head_dim=0), "head_dim"),
        (dict(segment_size=0), "segment_size"),
        (dict(draws=0), "draws"),
        (dict(rule="swla"), "rule"),
        (dict(init="frozen"), "init"),
        (dict(filler=-1), "filler"),
        (dict(keys="onehot"), "keys"),
        (dict(gate_scales=["sharp"]), "gate_scales"),
        (dict(gate_scales=[-1.0]), "gate_scales"),
        (dict(gate_scales=["raw", 1]), "gate_scales repeat"),
        (dict(gate_scales=["default", "default"]), "gate_scales repeat"),
        (dict(gate_scales=[True]), "gate_scales"),
    ],
)
def test_bad_settings_are_named(settings, named):
    with pytest.raises(ValueError, match=named):
        capacity_probe(**settings)


@pytest.mark.parametrize(
    ("option", "value"), [("--pairs", "0"), ("--head-dim", "0"), ("--segment-size", "0")]
)
def test_bad_options_are_named_on_one_line(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        probe.main(["capacity", option, value, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "expected an integer >= 1" in err
    assert not list(tmp_path.iterdir())
