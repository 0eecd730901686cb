"""Check that every sweep cell trains the same run before and after a change of the configs.

Run ``dump`` with each checkout's code (the sweep's cells are read from that checkout), then
``compare``::

    (cd OLD && PYTHONPATH=. python NEW/tools/sweep_equivalence.py dump /tmp/before.json)
    (cd NEW && PYTHONPATH=. python tools/sweep_equivalence.py dump /tmp/after.json)
    PYTHONPATH=NEW python NEW/tools/sweep_equivalence.py compare /tmp/before.json /tmp/after.json

``dump`` writes, per cell (seed 0): the resolved run config (run folder relative to the
checkout), its evaluations and result path, and the logits of the model it builds (seeded, on
fixed ids). ``compare`` requires equal task and train sections, evaluations and result paths,
equal model settings once flat memory settings are read as nested ones (GrowMemConfig's
conversion), and equal logits: the same architecture, initialisation and options.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path


def _resolved(experiment: str, cell):
    """The cell's RunConfig with seed 0, under either sweep API (preset or task + spec)."""
    from experiments import sweep

    if hasattr(sweep, "cell_config"):
        return sweep.cell_config(experiment, cell, 0)
    from growmem.cli import CONFIGS, resolve_config
    from growmem.training.config import load_config

    out = sweep.RUNS / experiment / sweep.slug(cell.name) / "seed0"
    settings = [*cell.overrides, "train.seed=0", f"train.out_dir={out}", "train.threads=1"]
    settings.append("train.progress=false")
    return load_config(resolve_config(cell.preset), settings, presets=CONFIGS)


def _logits(model_settings: dict) -> list[float]:
    """Per-position logit sums of the seeded model on fixed ids (vocabulary 300)."""
    import torch

    from growmem.models import GrowMemConfig, GrowMemForCausalLM

    torch.manual_seed(0)
    model = GrowMemForCausalLM(GrowMemConfig(vocab_size=300, **model_settings)).eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits.double().sum(-1).flatten().tolist()


def dump(path: Path) -> None:
    from experiments import sweep

    cells = {}
    for experiment, make in sweep.EXPERIMENTS.items():
        for cell in make():
            config = _resolved(experiment, cell).to_dict()
            train = config["train"]
            train["out_dir"] = str(Path(train["out_dir"]).relative_to(sweep.ROOT))
            cells[f"{experiment}/{cell.name}"] = {
                "config": config,
                "evals": cell.evals,
                "result": str(sweep.result_path(experiment, cell, 0).relative_to(sweep.ROOT)),
                "logits": _logits(config["model"]),
            }
    path.write_text(json.dumps(cells, indent=1, sort_keys=True))
    print(f"{len(cells)} cells -> {path}")


def _model(settings: dict) -> dict:
    """Every GrowMemConfig setting of a model section, memory as a full dict."""
    from growmem.training.config import model_settings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # flat settings of the old side
        return model_settings(settings)


def compare(before_path: Path, after_path: Path) -> int:
    before, after = (json.loads(p.read_text()) for p in (before_path, after_path))
    problems = []
    if set(before) != set(after):
        problems.append(f"cells differ: {sorted(set(before) ^ set(after))}")
    for name in sorted(set(before) & set(after)):
        b, a = before[name], after[name]
        for key in ("evals", "result"):
            if b[key] != a[key]:
                problems.append(f"{name}: {key} {b[key]!r} != {a[key]!r}")
        for section in ("task", "train"):
            was, now = b["config"][section], a["config"][section]
            if was != now:
                problems.append(f"{name}: {section} {was} != {now}")
        mb, ma = _model(b["config"]["model"]), _model(a["config"]["model"])
        if mb != ma:
            diff = {k: (mb.get(k), ma.get(k)) for k in set(mb) | set(ma) if mb.get(k) != ma.get(k)}
            problems.append(f"{name}: model {diff}")
        if b["logits"] != a["logits"]:
            worst = max(abs(x - y) for x, y in zip(b["logits"], a["logits"], strict=True))
            problems.append(f"{name}: logits differ (by up to {worst:.3g})")
    for problem in problems:
        print(problem)
    print(f"{len(set(before) & set(after))} cells compared, {len(problems)} differences")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("dump").add_argument("out", type=Path)
    p = commands.add_parser("compare")
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.out)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    raise SystemExit(main())
