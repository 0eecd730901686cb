"""The run folder: one run at a time, what a resume may change, checkpoints checked against
their checksums, what interrupted or failed sessions leave behind, and provenance."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from growmem.cli import main
from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.train import train
from growmem.training.checkpoint import (
    latest_checkpoint,
    load_weights,
    read_run_config,
    remove_temporaries,
)
from growmem.training.rundir import RunLock, check_resume, plan_run
from growmem.utils.provenance import provenance

from .common import (
    PYTHON,
    TINY_MODEL,
    loss_lines,
    raw_config,
    read_metrics,
    subprocess_env,
    text_corpus,
    tiny_config,
    write_yaml,
)

RESUMABLE = {"steps": 4, "checkpoint_every": 2}


def deterministic(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines]


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_line_error(capsys, command: str) -> str:
    """The single line a failed command printed to stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"growmem {command}: error: "), lines
    return lines[0]


def rewrite_checked(folder, name: str, text: str) -> None:
    """Replace a file of a checkpoint and its entry in SHA256SUMS (as a careful hand edit)."""
    (folder / name).write_text(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    listing = folder / "SHA256SUMS"
    if not listing.is_file():
        return
    lines = [
        f"{digest}  {name}" if line.endswith(f"  {name}") else line
        for line in listing.read_text().splitlines()
    ]
    listing.write_text("\n".join(lines) + "\n")


@pytest.fixture
def stopped_run(tmp_path):
    """A run of 4 steps stopped after its checkpoint at step 2, and its config file."""
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "run.yaml", raw_config(out, train=RESUMABLE))
    assert train(tiny_config(out, train=RESUMABLE), stop_after=2) is None
    return out, cfg


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The metrics of the same 4-step run, uninterrupted."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(tiny_config(out, train=RESUMABLE))
    return deterministic(loss_lines(out))


# ---------------------------------------------------------------- provenance


def test_run_folder_records_provenance(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(out, train={"steps": 2}))
    expected = provenance()
    assert {"torch", "transformers", "growmem"} <= set(expected["versions"])
    assert set(expected["git"]) == {"commit", "dirty"}
    assert read_run_config(out / "model")["provenance"] == expected
    assert read_run_config(latest_checkpoint(out))["provenance"] == expected
    assert json.loads((out / "model" / "eval.json").read_text())["provenance"] == expected
    assert main(["eval", str(out / "model"), "--out", str(tmp_path / "eval")]) == 0
    written = json.loads((tmp_path / "eval" / "eval-mqar.json").read_text())
    assert written["provenance"] == expected and "accuracy" in written


def test_folders_of_an_older_growmem_still_load(stopped_run, uninterrupted, tmp_path):
    """Folders without SHA256SUMS or provenance (as growmem wrote them before) resume and
    evaluate."""
    out, cfg = stopped_run
    folder = latest_checkpoint(out)
    (folder / "SHA256SUMS").unlink()
    record = yaml.safe_load((folder / "run.yaml").read_text())
    del record["provenance"], record["processes"]
    record["model"] = TINY_MODEL  # the config's model section, as they recorded it
    (folder / "run.yaml").write_text(yaml.safe_dump(record))
    assert main(["train", str(cfg), "--resume"]) == 0
    assert deterministic(loss_lines(out)) == uninterrupted
    model = out / "model"
    (model / "SHA256SUMS").unlink()
    record = yaml.safe_load((model / "run.yaml").read_text())
    del record["provenance"]
    record["model"] = TINY_MODEL
    (model / "run.yaml").write_text(yaml.safe_dump(record))
    assert main(["eval", str(model), "--out", str(tmp_path / "eval")]) == 0


# ---------------------------------------------------------------- checksums


def flip_a_bit(path, from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_bits_in_a_checkpoint_are_refused(stopped_run, capsys):
    out, cfg = stopped_run
    folder = latest_checkpoint(out)
    weights = folder / "model.safetensors"
    flip_a_bit(weights, from_end=5)  # tensor data, not the header: the file still loads
    load_file(str(weights))
    before = snapshot(out)
    assert main(["train", str(cfg), "--resume"]) == 2
    error = one_line_error(capsys, "train")
    assert f"{weights} differs from the sha256 recorded" in error
    assert snapshot(out) == before  # refused before anything was written
    assert main(["eval", str(folder)]) == 2
    assert "model.safetensors differs from the sha256" in one_line_error(capsys, "eval")

    flip_a_bit(weights, from_end=5)  # repaired
    flip_a_bit(folder / "trainer_state.pt", from_end=100)
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "trainer_state.pt differs from the sha256" in one_line_error(capsys, "train")


# ---------------------------------------------------------------- one run at a time


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_weights_without_the_head_load_only_into_a_tied_model(tmp_path, tied):
    """A tied model's safetensors hold no lm_head (it is the embedding); an untied model's
    weights without their head are another model's, not its embedding."""
    torch.manual_seed(0)
    config = GrowMemConfig(vocab_size=32, tie_word_embeddings=tied, **TINY_MODEL)
    saved, model = GrowMemForCausalLM(config), GrowMemForCausalLM(config)
    state = {k: v.contiguous() for k, v in saved.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors")
    if tied:
        load_weights(tmp_path, model)
        assert torch.equal(model.lm_head.weight, saved.model.embed_tokens.weight)
    else:
        with pytest.raises(ValueError, match=r"another model: missing \['lm_head.weight'\]"):
            load_weights(tmp_path, model)


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    settings = {"steps": 3, "checkpoint_every": 1}
    cfg = write_yaml(tmp_path / "run.yaml", raw_config(out, train=settings))
    inside, carry_on = threading.Event(), threading.Event()
    clip = torch.nn.utils.clip_grad_norm_

    def clip_waiting_in_step_2(*args, **kwargs):
        if threading.current_thread().name == "first" and latest_checkpoint(out) is not None:
            inside.set()
            carry_on.wait(60)
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_waiting_in_step_2)
    first = threading.Thread(target=train, args=(tiny_config(out, train=settings),), name="first")
    first.start()
    try:
        assert inside.wait(60), "the first run did not reach step 2"
        assert main(["train", str(cfg), "--resume"]) == 2
        error = one_line_error(capsys, "train")
        assert f"{out} is in use by another growmem run (pid " in error
    finally:
        carry_on.set()
        first.join(60)
    assert [m["step"] for m in loss_lines(out)] == [1, 2, 3]  # the first run's lines alone
    assert (out / ".lock").read_text() == ""  # released


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("pid 4194304 on elsewhere\n")  # left by a killed run
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", raw_config(out)))]) == 0
    printed = capsys.readouterr().out
    assert "took over the lock of pid 4194304 on elsewhere" in printed
    assert (out / "model").is_dir()


# ---------------------------------------------------------------- resuming with other settings


@pytest.mark.parametrize(
    "changes, listed",
    [
        (["train.lr=0.5"], ["train.lr 0.01 -> 0.5"]),
        (["train.seed=1"], ["train.seed 0 -> 1"]),
        (["train.batch_size=8"], ["4 x 1 x 1 = 4 -> 8 x 1 x 1 = 8"]),
        (
            ["train.bf16=true", "train.betas=[0.8, 0.9]", "train.warmup_steps=1"],
            ["train.bf16 False -> True", "train.betas", "train.warmup_steps 2 -> 1"],
        ),
    ],
)
def test_resume_refuses_settings_that_change_the_run(stopped_run, capsys, changes, listed):
    out, cfg = stopped_run
    before = snapshot(out)
    args = [a for change in changes for a in ("--set", change)]
    assert main(["train", str(cfg), "--resume", *args]) == 2
    error = one_line_error(capsys, "train")
    assert "would change the run's course" in error
    for item in listed:
        assert item in error
    assert snapshot(out) == before


def test_resume_a_checkpoint_whose_run_yaml_has_the_flat_model_keys(stopped_run, capsys):
    """A checkpoint of an earlier release (flat model keys, and the base's mini_batch that a
    gated_delta model never used) continues with the nested config of the same model; another
    model is still refused."""
    out, cfg = stopped_run
    folder = latest_checkpoint(out)
    record = yaml.safe_load((folder / "run.yaml").read_text())
    memory = record["model"].pop("memory")
    flat = {"rule": memory["rule"], "aggregation": memory["caching"]["aggregation"]}
    flat.update(segment_size=memory["caching"]["segment_size"], mini_batch=16)
    record["model"].update(flat)
    rewrite_checked(folder, "run.yaml", yaml.safe_dump(record))
    other = ["--set", "model.memory.caching.segment_size=8"]
    with pytest.warns(FutureWarning, match="flat memory settings"):
        assert main(["train", str(cfg), "--resume", *other]) == 2
    assert "is from another model or task" in one_line_error(capsys, "train")
    same = ["--set", "model.memory.chunk_size=64"]  # the default, spelled out
    with pytest.warns(FutureWarning, match="flat memory settings"):
        assert main(["train", str(cfg), "--resume", *same]) == 0


def test_a_run_yaml_of_an_earlier_release_keeps_the_gates_of_then(tmp_path, capsys):
    """Earlier releases recorded the model section as the config gave it; one without the gate
    settings, from before they existed, meant the gates of then (the scaled dot product, no
    temperature). A grm run resumes with them spelled out, and the same config without them,
    which means today's default gates now, is refused as another model."""
    out = tmp_path / "run"
    memory = {"rule": "gated_delta", "caching": {"aggregation": "grm", "segment_size": 16}}
    caching = {**memory["caching"], "gate_norm": "none"}
    legacy = {**memory, "caching": caching, "gate_temperature": None, "summary_source": "keys"}
    settings = dict(model={"memory": legacy}, train=RESUMABLE)
    then = write_yaml(tmp_path / "then.yaml", raw_config(out, **settings))
    assert train(tiny_config(out, **settings), stop_after=2) is None
    folder = latest_checkpoint(out)
    record = yaml.safe_load((folder / "run.yaml").read_text())
    assert record["model"]["memory"]["summary_source"] == "keys"  # recorded in full now
    record["model"]["memory"] = memory
    rewrite_checked(folder, "run.yaml", yaml.safe_dump(record))
    assert read_run_config(folder)["model"]["memory"] == legacy
    today = raw_config(out, model={"memory": memory}, train=RESUMABLE)
    today = write_yaml(tmp_path / "today.yaml", today)
    assert main(["train", str(today), "--resume"]) == 2
    assert "is from another model or task" in one_line_error(capsys, "train")
    assert main(["train", str(then), "--resume"]) == 0


def test_resume_refuses_another_process_count_with_the_same_batch(stopped_run, capsys):
    out, cfg = stopped_run
    folder = latest_checkpoint(out)
    record = yaml.safe_load((folder / "run.yaml").read_text())
    rewrite_checked(folder, "run.yaml", yaml.safe_dump({**record, "processes": 2}))
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "4 x 1 x 2 = 8 -> 4 x 1 x 1 = 4" in one_line_error(capsys, "train")
    # the same global batch on one process: applied, and said
    assert main(["train", str(cfg), "--resume", "--set", "train.batch_size=8"]) == 0
    printed = capsys.readouterr().out
    assert "train.batch_size 4 -> 8, processes 2 -> 1" in printed


def test_resume_applies_and_reports_harmless_changes(stopped_run, uninterrupted, capsys):
    out, cfg = stopped_run
    changes = [
        "train.batch_size=2",
        "train.grad_accum=2",  # the same global batch, split in two
        "train.eval_every=3",
        "train.threads=1",
        "train.keep_checkpoints=3",
    ]
    assert main(["train", str(cfg), "--resume", *(a for c in changes for a in ("--set", c))]) == 0
    printed = capsys.readouterr().out
    assert (
        "resuming from step 2 with changed settings: train.batch_size 4 -> 2, "
        "train.grad_accum 1 -> 2, train.eval_every 0 -> 3, train.keep_checkpoints 2 -> 3"
    ) in printed
    resumed = deterministic(loss_lines(out))
    assert resumed[:2] == uninterrupted[:2]
    for a, b in zip(resumed[2:], uninterrupted[2:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert [m["step"] for m in read_metrics(out) if "eval" in m] == [3, 4]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["grad_accum"] == 2


def test_resume_with_more_steps_or_fewer(stopped_run, capsys):
    out, cfg = stopped_run
    assert main(["train", str(cfg), "--resume", "--set", "train.steps=1"]) == 2
    assert "step_00000002 is at step 2, beyond train.steps=1" in one_line_error(capsys, "train")
    assert main(["train", str(cfg), "--resume", "--set", "train.steps=6"]) == 0
    assert "(the learning-rate schedule now ends at step 6)" in capsys.readouterr().out
    assert [m["step"] for m in loss_lines(out)] == [1, 2, 3, 4, 5, 6]


def test_a_run_checkpointed_at_its_last_step_may_resume_to_finish(tmp_path):
    # killed after its final checkpoint, before writing model/: resuming it finishes the run
    config = tiny_config(tmp_path / "run", train=RESUMABLE)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert check_resume(checkpoint, config.to_dict(), config, processes=1) == []


# ---------------------------------------------------------------- what failed sessions leave


def test_torn_last_metrics_line_is_dropped_on_resume(stopped_run, uninterrupted, capsys):
    out, cfg = stopped_run
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # the writer was killed mid-line
    assert main(["train", str(cfg), "--resume"]) == 0
    assert "dropped the torn last line" in capsys.readouterr().out
    assert deterministic(loss_lines(out)) == uninterrupted


def test_damaged_metrics_line_is_named(stopped_run, capsys):
    out, cfg = stopped_run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "metrics.jsonl, line 2: not a metrics record" in one_line_error(capsys, "train")


def test_a_run_that_failed_before_its_first_checkpoint_can_be_rerun(
    tmp_path, uninterrupted, monkeypatch, capsys
):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "run.yaml", raw_config(out, train=RESUMABLE))
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def failing_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine went away")
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", failing_in_step_2)
    with pytest.raises(RuntimeError, match="went away"):
        main(["train", str(cfg)])
    monkeypatch.undo()
    assert [m["step"] for m in read_metrics(out)] == [1]
    assert not (out / "checkpoints").exists()
    capsys.readouterr()

    assert main(["train", str(cfg), "--resume"]) == 2
    error = one_line_error(capsys, "train")
    assert "stopped before its first checkpoint" in error and "without --resume" in error
    assert main(["train", str(cfg)]) == 0  # what the error says works
    assert "starting it over" in capsys.readouterr().out
    assert deterministic(loss_lines(out)) == uninterrupted


@pytest.mark.parametrize("same_task", [True, False], ids=["same-task", "other-task"])
def test_a_void_run_keeps_its_tokenizer_for_the_same_task_only(tmp_path, same_task):
    """Starting over a run that stopped before its first checkpoint clears what it logged; its
    trained tokenizer stays when the new run has the same task (it would train the same one)."""
    out = tmp_path / "run"
    config = tiny_config(out)
    before = config if same_task else tiny_config(out, task={"seq_len": 64})
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    (out / "config.yaml").write_text(yaml.safe_dump(before.to_dict(), sort_keys=False))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.5}\n')
    lock = RunLock(out)
    try:
        plan = plan_run(out, config, False, 1, lock)
    finally:
        lock.release()
    assert plan.checkpoint is None and "starting it over" in plan.notes[-1]
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()
    assert (out / "tokenizer").is_dir() == same_task


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, monkeypatch, capsys):
    import errno
    import os

    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "run.yaml", raw_config(out, train=RESUMABLE))
    assert main(["train", str(cfg), "--stop-after", "2"]) == 0
    checkpoint = latest_checkpoint(out)
    before = snapshot(checkpoint)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    assert main(["train", str(cfg), "--resume"]) == 2
    error = one_line_error(capsys, "train")
    assert "could not write" in error and "step_00000004 (No space left on device)" in error
    assert latest_checkpoint(out) == checkpoint and snapshot(checkpoint) == before
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()  # space freed
    assert main(["train", str(cfg), "--resume"]) == 0


@pytest.mark.parametrize("where", ["elsewhere", "absolute", "dots", "not a step"])
def test_latest_must_name_a_checkpoint_of_this_run(stopped_run, tmp_path, capsys, where):
    out, cfg = stopped_run
    other = tmp_path / "other"
    train(tiny_config(other, train=RESUMABLE), stop_after=2)  # a checkpoint outside the run
    target = other / "checkpoints" / "step_00000002"
    name = {
        "elsewhere": "../../other/checkpoints/step_00000002",
        "absolute": str(target),
        "dots": "step_00000002/../../../other/checkpoints/step_00000002",
        "not a step": "../model",
    }[where]
    (out / "checkpoints" / "latest").write_text(name + "\n")
    (out / "model").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="must name a step_N folder"):
        latest_checkpoint(out)
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "must name a step_N folder" in one_line_error(capsys, "train")


def test_a_checkpoint_killed_mid_write_leaves_nothing_after_the_next_start(stopped_run, capsys):
    out, cfg = stopped_run
    # a resumed session killed (SIGKILL: no clean-up runs) while writing checkpoint 4
    script = (
        "import os, signal, sys, torch\n"
        "from growmem.cli import main\n"
        "torch.save = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"main(['train', {str(cfg)!r}, '--resume'])\n"
    )
    done = subprocess.run([PYTHON, "-c", script], env=subprocess_env(), timeout=120)
    assert done.returncode == -signal.SIGKILL
    hidden = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert hidden, "the killed save left no temporary folder: the test does not test"
    assert latest_checkpoint(out).name == "step_00000002"

    assert main(["train", str(cfg), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "removed what an interrupted write left behind" in printed
    assert "took over the lock of pid" in printed
    left = [p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()]]
    assert [name for name in left if name.startswith(".")] == [".lock"]
    assert latest_checkpoint(out).name == "step_00000004"


def test_a_folder_moved_aside_for_a_replacement_that_never_came_is_put_back(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, train={"steps": 2}))
    before = snapshot(out / "model")
    # killed between moving the old model aside and moving its replacement in
    (out / "model").rename(out / ".tmp-stale-model-0123abcd")
    (out / ".tmp-model-89abcdef").mkdir()
    assert remove_temporaries(out) == [".tmp-model-89abcdef", ".tmp-stale-model-0123abcd"]
    assert snapshot(out / "model") == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]


def test_resume_a_checkpoint_recorded_before_the_new_settings(tmp_path):
    """A run.yaml written before a task or train setting existed had that setting's default:
    the run continues (the LM corpus settings of issue 26 and the schedule settings)."""
    corpus = text_corpus(tmp_path / "corpus", num_train=2, num_val=1, chars=400)
    task = {"name": "lm", "corpus": str(corpus), "seq_len": 16, "eval_blocks": 1}
    config = tiny_config(tmp_path / "run", task=task, train={"steps": 3})
    assert train(config, stop_after=2) is None
    folder = latest_checkpoint(tmp_path / "run")
    record = yaml.safe_load((folder / "run.yaml").read_text())
    for key in ("train_split", "text_field", "num_workers", "token_dtype", "eval_corpus"):
        del record["task"][key]
    for key in ("schedule", "decay_fraction", "tensorboard"):
        del record["train"][key]
    rewrite_checked(folder, "run.yaml", yaml.safe_dump(record))
    assert train(config, resume=True) == tmp_path / "run" / "model"
