"""The optional flash-linear-attention (fla) scans (growmem/ops/linear/fla_scan.py), on CPU.

fla's Triton kernels need a GPU, so these tests check the glue: stand-ins with fla's public
signatures and documented conventions (time-first [B, T, H, D], state [B, H, Dk, Dv], default
scale Dk^-0.5, log-decay g, final state only), computed by growmem's per-token reference,
replace the fla ops. Against them: outputs, per-segment states and every gradient equal
growmem's PyTorch chunk path in float64, directly, through chunk_linear_memory's dispatch and
through memory_caching (continuous and independent init); and the choice itself: "auto" never
tries fla on CPU tensors, a missing or out-of-range fla falls back with one warning, an
explicit "fla" that cannot run is an error.
"""

from __future__ import annotations

import sys
import tomllib
import types
import warnings
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from growmem.ops import Caching, memory_caching, memory_spec
from growmem.ops.linear import chunk_linear_memory, fla_scan, linear_memory_reference
from growmem.ops.linear.fla_scan import FLA_GATES, FLA_VERSIONS, fla_linear_memory
from tests.helpers import arg, assert_close, assert_grads_close, make_inputs, outputs_and_grads

B, T, H, DK, DV = 2, 37, 3, 6, 5  # Dk != Dv: a state in the wrong layout cannot even broadcast
TOL64 = 1e-9
FLA_RULES = tuple(FLA_GATES)


def _fla_semantics(rule, q, k, v, scale, initial_state, output_final_state, gates, l2norm=False):
    """What fla's chunk ops compute, by growmem's reference, checking fla's documented shapes."""
    Bq, Tq, Hq, K = q.shape
    V = v.shape[-1]
    assert k.shape == q.shape and v.shape == (Bq, Tq, Hq, V), "fla takes [B, T, H, D]"
    assert q.dtype == k.dtype == v.dtype, "fla takes q, k, v of one dtype"
    assert all(x.shape == (Bq, Tq, Hq) for x in gates.values()), "fla's gates are [B, T, H]"
    if initial_state is not None:
        assert initial_state.shape == (Bq, Hq, K, V), "fla's state is [B, H, K, V]"
    if l2norm:  # fla's in-kernel normalisation of q and k
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    scale = K**-0.5 if scale is None else scale
    h0 = None if initial_state is None else initial_state.transpose(-1, -2)
    o, S = linear_memory_reference(q * scale, k, v, rule=rule, **gates, initial_state=h0)
    return o.to(q.dtype), S.transpose(-1, -2) if output_final_state else None


def chunk_simple_gla(
    q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
    cu_seqlens=None,
):  # fmt: skip
    """fla.ops.chunk_simple_gla's signature (fla 0.5-0.6; no **kwargs here, so that a misnamed
    keyword fails)."""
    assert g_gamma is None and cu_seqlens is None
    gates = {} if g is None else {"g": g}
    rule = "linear" if g is None else "decay"
    return _fla_semantics(rule, q, k, v, scale, initial_state, output_final_state, gates)


def chunk_delta_rule(
    q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, cu_seqlens=None,
):  # fmt: skip
    """fla.ops.chunk_delta_rule's signature."""
    assert cu_seqlens is None
    gates = {"beta": beta}
    return _fla_semantics(
        "delta", q, k, v, scale, initial_state, output_final_state, gates, use_qk_l2norm_in_kernel
    )


def chunk_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, cu_seqlens=None,
):  # fmt: skip
    """fla.ops.chunk_gated_delta_rule's signature."""
    assert cu_seqlens is None
    gates = {"g": g, "beta": beta}
    return _fla_semantics(
        "gated_delta", q, k, v, scale, initial_state, output_final_state, gates,
        use_qk_l2norm_in_kernel,
    )  # fmt: skip


STAND_INS = {
    "linear": chunk_simple_gla,
    "decay": chunk_simple_gla,
    "delta": chunk_delta_rule,
    "gated_delta": chunk_gated_delta_rule,
}


class Counted:
    """An op that counts its calls."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.op(*args, **kwargs)


@pytest.fixture
def fla_on_cpu(monkeypatch):
    """fla 'installed' as the counted stand-ins and allowed on CPU float64 tensors; the
    warnings already given are restored afterwards."""
    ops = {rule: Counted(op) for rule, op in STAND_INS.items()}
    monkeypatch.setattr(fla_scan, "load_fla", lambda: (ops, ""))
    monkeypatch.setattr(fla_scan, "FLA_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(fla_scan, "FLA_DTYPES", (torch.float32, torch.float64))
    monkeypatch.setattr(fla_scan, "_warned", set())
    return ops


@pytest.fixture
def no_fla(monkeypatch):
    """No fla: its import fails; the warnings already given are forgotten."""
    monkeypatch.setitem(sys.modules, "fla", None)  # `import fla` raises ImportError
    monkeypatch.setattr(fla_scan, "_warned", set())
    fla_scan.load_fla.cache_clear()
    yield
    fla_scan.load_fla.cache_clear()


def scan_inputs(rule, seed=0):
    q, k, v, gates, s0 = make_inputs(rule, B, T, H, DK, DV, seed=seed, requires_grad=True)
    return {"q": q, "k": k, "v": v, **gates, "initial_state": s0}


def scan(named, rule, **kw):
    named = dict(named)
    q, k, v = named.pop("q"), named.pop("k"), named.pop("v")
    return chunk_linear_memory(q, k, v, rule=rule, chunk_size=8, **named, **kw)


# ends: none, the segment boundaries of a continuous-init Memory Caching scan (uneven, the last
# one T), and an unsorted request with a repeat that does not end at T
ENDS = [None, [5, 16, 30, T], [30, 5, 12, 5]]


@pytest.mark.parametrize("ends", ENDS, ids=["final", "segments", "unsorted"])
@pytest.mark.parametrize("rule", FLA_RULES)
def test_fla_conventions_and_chained_states_match_the_chunk_path(rule, ends):
    named = scan_inputs(rule)
    op = Counted(STAND_INS[rule])

    def fla():
        rest = {n: x for n, x in named.items() if n not in "qkv"}
        return fla_linear_memory(
            op, named["q"], named["k"], named["v"], rule=rule, **rest, ends=ends
        )

    (o, states), grads = outputs_and_grads(fla, named)
    (o_ref, states_ref), grads_ref = outputs_and_grads(
        lambda: scan(named, rule, ends=ends, scan_impl="torch"), named
    )
    assert_close(o, o_ref, TOL64, f"{rule} o")
    assert_close(states, states_ref, TOL64, f"{rule} states")
    assert_grads_close(grads, grads_ref, TOL64, rule)
    # one call per piece between the sorted distinct ends and T
    assert op.calls == len({*(ends or ()), T})


@pytest.mark.parametrize("rule", FLA_RULES)
def test_auto_dispatches_to_fla_where_it_runs(fla_on_cpu, rule):
    named = {n: x for n, x in scan_inputs(rule).items() if n != "initial_state"}  # zeros
    (o, states), grads = outputs_and_grads(lambda: scan(named, rule, ends=[16, T]), named)
    assert fla_on_cpu[rule].calls == 2
    (o_ref, states_ref), grads_ref = outputs_and_grads(
        lambda: scan(named, rule, ends=[16, T], scan_impl="torch"), named
    )
    assert fla_on_cpu[rule].calls == 2  # "torch" never calls fla
    assert_close(o, o_ref, TOL64, "o")
    assert_close(states, states_ref, TOL64, "states")
    assert_grads_close(grads, grads_ref, TOL64, rule)


def test_mixed_input_dtypes_reach_fla_in_one_dtype(fla_on_cpu):
    named = scan_inputs("gated_delta")
    named["k"] = named["k"].detach().float().requires_grad_()  # e.g. an fp32 norm's output
    (o, states), grads = outputs_and_grads(lambda: scan(named, "gated_delta"), named)
    assert fla_on_cpu["gated_delta"].calls == 1
    (o_ref, states_ref), grads_ref = outputs_and_grads(
        lambda: scan(named, "gated_delta", scan_impl="torch"), named
    )
    assert o.dtype == states.dtype == torch.float64
    assert_close(o, o_ref, TOL64, "o")
    assert_close(states, states_ref, TOL64, "states")
    assert_grads_close(grads, grads_ref, TOL64, "mixed dtypes")


@pytest.mark.parametrize("init", ["continuous", "independent"])
@pytest.mark.parametrize("aggregation", ["none", "grm", "ssc"])
def test_memory_caching_through_fla_equals_the_torch_scans(fla_on_cpu, aggregation, init):
    rule = "gated_delta"
    named = scan_inputs(rule, seed=1)
    u = torch.randn(B, T, H, DK, dtype=torch.float64, requires_grad=True)
    named["u"] = u
    caching = Caching(aggregation=aggregation, segment_size=8, init=init, top_k=2)

    def run(scan_impl="auto"):
        return memory_caching(
            named["q"], named["k"], named["v"], named["u"],
            memory=memory_spec(rule, chunk_size=4, scan_impl=scan_impl), caching=caching,
            gates={"g": named["g"], "beta": named["beta"]},
            initial_state=named["initial_state"],
        )  # fmt: skip

    o, grads = outputs_and_grads(run, named)
    assert fla_on_cpu[rule].calls > 0
    calls = fla_on_cpu[rule].calls
    o_ref, grads_ref = outputs_and_grads(lambda: run("torch"), named)
    assert fla_on_cpu[rule].calls == calls
    assert_close(o, o_ref, TOL64, f"{aggregation}/{init} o")
    assert_grads_close(grads, grads_ref, TOL64, f"{aggregation}/{init}")


def test_auto_never_tries_fla_on_cpu_tensors_nor_for_swla(fla_on_cpu, monkeypatch):
    monkeypatch.setattr(fla_scan, "FLA_DEVICE_TYPES", ("cuda",))
    for rule in (*FLA_RULES, "swla"):
        named = scan_inputs(rule)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and without a warning: CPU is no fallback
            o, _ = scan(named, rule)
            o_ref, _ = scan(named, rule, scan_impl="torch")
        assert torch.equal(o, o_ref)
    assert all(op.calls == 0 for op in fla_on_cpu.values())
    # swla has no fla op, on any device
    monkeypatch.setattr(fla_scan, "FLA_DEVICE_TYPES", ("cpu",))
    named = scan_inputs("swla")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan(named, "swla")


def test_missing_fla_falls_back_with_one_warning(no_fla, monkeypatch):
    monkeypatch.setattr(fla_scan, "FLA_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(fla_scan, "FLA_DTYPES", (torch.float64,))
    named = scan_inputs("gated_delta")
    expected, _ = scan(named, "gated_delta", scan_impl="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [scan(named, "gated_delta", scan_impl="auto")[0] for _ in range(3)]
    assert [type(w.message) for w in caught] == [RuntimeWarning]
    assert "flash-linear-attention is not importable" in str(caught[0].message)
    assert all(torch.equal(o, expected) for o in outs)
    with pytest.raises(ImportError, match="scan_impl 'fla' cannot run: flash-linear-attention"):
        scan(named, "gated_delta", scan_impl="fla")


def fake_fla(monkeypatch, version):
    """An importable ``fla`` of ``version`` whose ops are the stand-ins."""
    fla = types.ModuleType("fla")
    fla.__version__ = version
    ops = types.ModuleType("fla.ops")
    for name in ("chunk_simple_gla", "chunk_delta_rule", "chunk_gated_delta_rule"):
        setattr(ops, name, globals()[name])
    fla.ops = ops
    monkeypatch.setitem(sys.modules, "fla", fla)
    monkeypatch.setitem(sys.modules, "fla.ops", ops)


@pytest.mark.parametrize("version", ["0.4.2", "0.7.0", "nightly"])
def test_fla_outside_the_tested_range_falls_back_with_one_warning(no_fla, monkeypatch, version):
    fake_fla(monkeypatch, version)
    monkeypatch.setattr(fla_scan, "FLA_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(fla_scan, "FLA_DTYPES", (torch.float64,))
    named = scan_inputs("delta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan(named, "delta")
        scan(named, "delta")
    assert len(caught) == 1
    assert f"flash-linear-attention {version} is outside the tested range" in str(caught[0].message)
    with pytest.raises(ImportError, match="outside the tested range"):
        scan(named, "delta", scan_impl="fla")


def test_fla_in_the_tested_range_gives_each_rule_its_op(no_fla, monkeypatch):
    fake_fla(monkeypatch, "0.6.0")
    ops, why = fla_scan.load_fla()
    assert why == ""
    assert {rule: op.__name__ for rule, op in ops.items()} == {
        "linear": "chunk_simple_gla",
        "decay": "chunk_simple_gla",
        "delta": "chunk_delta_rule",
        "gated_delta": "chunk_gated_delta_rule",
    }


def test_explicit_fla_that_cannot_run_is_an_error_and_bad_choices_are_refused(
    fla_on_cpu, monkeypatch
):
    named = scan_inputs("gated_delta")
    monkeypatch.setattr(fla_scan, "FLA_DTYPES", (torch.float32,))
    with pytest.raises(ValueError, match="scan_impl 'fla' cannot run: fla's kernels take"):
        scan(named, "gated_delta", scan_impl="fla")  # float64
    monkeypatch.setattr(fla_scan, "FLA_DEVICE_TYPES", ("cuda",))
    with pytest.raises(ValueError, match=r"scan_impl 'fla' cannot run: .* tensors are on cpu"):
        scan(named, "gated_delta", scan_impl="fla")
    with pytest.raises(ValueError, match="scan_impl 'fla' cannot run: rule 'swla'"):
        scan(scan_inputs("swla"), "swla", scan_impl="fla")
    with pytest.raises(ValueError, match=arg("scan_impl")):
        scan(named, "gated_delta", scan_impl="triton")
    with pytest.raises(ValueError, match=arg("scan_impl")):
        memory_spec("gated_delta", scan_impl="cuda")


def test_the_fla_extra_pins_the_tested_range():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    (extra,) = (Requirement(r) for r in pyproject["project"]["optional-dependencies"]["fla"])
    assert extra.name == "flash-linear-attention" and extra.specifier == FLA_VERSIONS
