"""The titans probe: what it measures holds at small sizes, and its script writes its JSON."""

import json
import math

from experiments import titans_probe


def test_titans_stores_pairs_that_filler_writes_then_overwrite():
    clean = titans_probe.storage_probe("titans", 1.0, fillers=0, batch=8)
    flooded = titans_probe.storage_probe("titans", 1.0, fillers=40, batch=8)
    assert clean["recall"] == 1.0 and clean["cosine"] > 0.8
    assert flooded["cosine"] < 0.5 * clean["cosine"]


def test_per_token_titans_updates_keep_the_pairs_through_filler_writes():
    # the filler's gradients no longer pile up at one mini-batch's entry weights
    per_token = titans_probe.storage_probe("titans", 1.0, fillers=40, batch=8, mini_batch=1)
    assert per_token["recall"] >= 0.9


def test_delta_rule_keeps_its_pairs_through_filler_writes():
    flooded = titans_probe.storage_probe("gated_delta", 0.5, fillers=40, batch=8)
    assert flooded["recall"] == 1.0 and flooded["cosine"] > 0.8


def test_read_path_ratio_grows_with_the_inner_learning_rate():
    low = titans_probe.read_path_probe("titans", eta_max=0.1)
    high = titans_probe.read_path_probe("titans", eta_max=1.0)
    assert math.isfinite(low) and 0 < low < high


def test_small_mini_batches_at_a_large_inner_rate_keep_the_outer_gradient_bounded():
    """With titans' decay toward the initial weights (issue 21) mini-batch 1 at an inner rate
    bound of 1.0 no longer explodes the outer gradient (7e5 with the decay toward zero)."""
    stable = titans_probe.outer_gradient_norm(mini_batch=1, eta_max=0.1)
    large_rate = titans_probe.outer_gradient_norm(mini_batch=1, eta_max=1.0)
    one_batch = titans_probe.outer_gradient_norm(mini_batch=16, eta_max=1.0)
    assert stable < 10 and one_batch < 10 and large_rate < 10 * stable


def test_main_writes_every_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(titans_probe, "storage_probe", lambda *a, **k: {"recall": 1, "cosine": 1})
    monkeypatch.setattr(titans_probe, "read_path_probe", lambda *a, **k: 0.5)
    monkeypatch.setattr(titans_probe, "step_seconds", lambda *a, **k: 1.0)
    monkeypatch.setattr(titans_probe, "outer_gradient_norm", lambda *a, **k: 2.0)
    out = tmp_path / "probe.json"
    titans_probe.main(["--out", str(out)])
    data = json.loads(out.read_text())
    assert len(data["storage"]) == 22 and set(data["read_path"]) == {
        "gated_delta",
        "titans, eta_max 0.1",
        "titans, eta_max 1.0",
    }
    assert set(data["step_seconds"]) == {
        "gated_delta",
        "titans, mini-batch 16",
        "titans, mini-batch 4",
        "titans, mini-batch 2",
        "titans, mini-batch 1",
    }
    assert len(data["outer_gradient_norm"]) == 9
