"""The GPU benchmark's smoke mode (benchmarks/bench_gpu.py), so that the script does not rot
between GPU runs: it runs on CPU at toy sizes and writes the JSON every section promises."""

from __future__ import annotations

import json

from benchmarks import bench_gpu


def test_smoke_mode_writes_every_section(tmp_path):
    out = bench_gpu.main(["--smoke", "--device", "cpu", "--out", str(tmp_path / "gpu.json")])
    result = json.loads(out.read_text())
    assert set(result["provenance"]) == {"versions", "git", "python"}
    assert result["machine"]["device"] == "cpu" and result["setting"]["mode"] == "smoke"
    assert result["fla"]["used"] is False  # CPU tensors never run fla
    smoke = bench_gpu.SMOKE
    names = {"sdpa_flash", "scan_torch", *(f"mc_{a}" for a in bench_gpu.AGGREGATIONS)}
    assert [row["T"] for row in result["ops"]] == smoke["lengths"]
    for row in result["ops"]:
        assert set(row["results"]) == names
        assert all(cell["tokens_per_s"] > 0 for cell in row["results"].values())
    assert set(result["train"]) == set(bench_gpu.MODELS)
    for cell in result["train"].values():
        assert cell["batch"] == smoke["train_batch"] and cell["tokens_per_s"] > 0
    rows = result["decode"]
    assert [row["context"] for row in rows] == smoke["contexts"]
    for row in rows:
        assert set(row["models"]) == set(bench_gpu.MODELS)
        assert all(cell["decode_step_s"] > 0 for cell in row["models"].values())
    # what the cache bytes must show: attention's cache grows with the context, a plain
    # recurrent memory's does not, Memory Caching's grows by a state per segment
    first, last = (row["models"] for row in rows)
    assert last["transformer"]["cache_bytes"] > first["transformer"]["cache_bytes"]
    assert last["gated_delta"]["cache_bytes"] == first["gated_delta"]["cache_bytes"]
    assert last["gated_delta+grm"]["cache_bytes"] > first["gated_delta+grm"]["cache_bytes"]


def test_a_spent_budget_skips_with_the_reason_and_still_writes(tmp_path):
    out = tmp_path / "gpu.json"
    bench_gpu.main(["--smoke", "--device", "cpu", "--budget-s", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    reason = "time budget of 0 s spent"
    assert all(row["skipped"] == reason for row in result["ops"] + result["decode"])
    assert all(cell["skipped"] == reason for cell in result["train"].values())
