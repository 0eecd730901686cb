"""``growmem generate`` and growmem.generate: the text equals the model's own generate, streams
whole characters, reads its prompt from the argument, stdin or a file, reports speed and cache
bytes, and refuses bad input in one line."""

from __future__ import annotations

import io
import shutil
import sys

import pytest
import torch

from growmem.cli import main
from growmem.generate import TextStream, generate_text, load_for_generation, model_folder
from growmem.models import GrowMemCache, GrowMemConfig, GrowMemForCausalLM
from growmem.tasks import BPETokenizer, ByteTokenizer
from growmem.training.checkpoint import save_checkpoint, save_model_folder

from .common import raw_config

BYTE = ByteTokenizer()


def tiny_model(vocab_size: int = BYTE.vocab_size) -> GrowMemForCausalLM:
    """A memory layer (segments of 4 tokens) and an attention layer; init scale 0.3 so that
    the text varies with the prompt."""
    torch.manual_seed(0)
    config = GrowMemConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_heads=2,
        memory={"caching": {"segment_size": 4}},
        attn_layers=[1],
        initializer_range=0.3,
    )
    return GrowMemForCausalLM(config).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("generate") / "model"
    save_model_folder(path, tiny_model(), raw_config(path.parent), BYTE)
    return path


def reference(prompt: str, max_new_tokens: int) -> str:
    """Greedy text of the model's generate after eos + the prompt."""
    model = tiny_model()
    ids = torch.tensor([[BYTE.eos_id, *BYTE.encode(prompt)]])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=BYTE.eos_id,
        pad_token_id=BYTE.pad_id,
    )
    return BYTE.decode(out[0, ids.shape[1] :].tolist())


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def terminal_stdin(monkeypatch):
    """Standard input as in a terminal (not piped): no prompt unless one is given."""
    monkeypatch.setattr(sys, "stdin", Terminal())


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        status = main(["generate", *map(str, args)])
    except SystemExit as error:  # argparse's errors
        status = error.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_greedy_text_is_the_models_generate(folder, capsys):
    expected = reference("Hello", 12)
    assert reference("Hello", 12) != reference("World", 12)  # the prompt matters
    greedy = ("--temperature", "0", "--max-new-tokens", "12")
    status, out, _ = run(capsys, folder, "--prompt", "Hello", *greedy)
    assert status == 0 and out == expected + "\n"


def test_streamed_text_equals_the_final_text(folder):
    model, tokenizer = load_for_generation(folder)
    out = io.StringIO()
    options = {"max_new_tokens": 40, "temperature": 1.0, "seed": 3}
    result = generate_text(model, tokenizer, "abc", out=out, **options)
    assert out.getvalue() == result.text and result.new_tokens == 40


def test_stream_writes_only_whole_characters():
    writes = []
    sink = type("Sink", (), {"write": lambda self, t: writes.append(t), "flush": lambda self: 0})
    stream = TextStream(BYTE, sink())
    text = "né 東京 😀!"
    stream.put(torch.tensor([[BYTE.eos_id]]))  # the prompt: not written
    for byte in BYTE.encode(text):
        stream.put(torch.tensor([byte]))
    stream.put(torch.tensor([BYTE.eos_id]))
    stream.end()
    assert "".join(writes) == text
    assert all("\ufffd" not in piece for piece in writes)
    assert "😀" in writes  # written once its fourth byte came


def test_seed_makes_sampling_repeatable(folder, capsys):
    args = (folder, "--prompt", "x", "--temperature", "1.5", "--top-k", "0", "--seed", "7")
    first, second = run(capsys, *args), run(capsys, *args)
    other = run(capsys, *args[:-1], "8")
    assert first == second and first[1] != other[1]


def test_prompt_from_stdin_and_file(folder, capsys, monkeypatch, tmp_path):
    greedy = ("--temperature", "0", "--max-new-tokens", "8")
    _, expected, _ = run(capsys, folder, "--prompt", "Hello\nthere", *greedy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nthere"))
    assert run(capsys, folder, *greedy)[1] == expected  # piped, no --prompt
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nthere"))
    assert run(capsys, folder, "--prompt", "-", *greedy)[1] == expected
    (tmp_path / "prompt.txt").write_text("Hello\nthere")
    assert run(capsys, folder, "--prompt-file", tmp_path / "prompt.txt", *greedy)[1] == expected


def test_stats_report_speed_and_cache_bytes(folder, capsys):
    greedy = ("--temperature", "0", "--max-new-tokens", "10")
    status, _, err = run(capsys, folder, "--prompt", "abcdefgh", *greedy, "--stats")
    assert status == 0
    assert "prompt 9 tokens, " in err and "tokens/s" in err
    # 9 + 10 tokens, the last one never read back: 18 tokens, 4 finished segments of 4
    model, _ = load_for_generation(folder)
    cache = GrowMemCache(2)
    with torch.no_grad():
        model(torch.zeros(1, 18, dtype=torch.long), use_cache=True, cache=cache)
    parts = cache.nbytes_by_part()
    assert parts["cached_segments"] > 0 and parts["attention"] > 0
    expected = (
        f"cache {cache.nbytes():,} bytes: cached segments {parts['cached_segments']:,}, "
        f"online state {parts['online']:,}, attention keys/values {parts['attention']:,}"
    )
    assert expected in err


def test_cache_parts_cached_segments_and_attention_grow_online_state_does_not():
    model = tiny_model()
    parts = []
    for length in (8, 16):
        cache = GrowMemCache(2)
        with torch.no_grad():
            model(torch.zeros(1, length, dtype=torch.long), use_cache=True, cache=cache)
        parts.append(cache.nbytes_by_part())
        assert sum(parts[-1].values()) == cache.nbytes()
    short, long = parts
    assert short["online"] == long["online"]
    assert long["cached_segments"] > short["cached_segments"] > 0
    assert long["attention"] > short["attention"]


def test_run_folder_resolves_to_its_model_or_latest_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    state = {"scheduler": {}}
    save_checkpoint(run_dir, 3, tiny_model(), raw_config(run_dir), state, BYTE)
    assert model_folder(run_dir) == run_dir / "checkpoints" / "step_00000003"
    greedy = ("--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "6")
    assert run(capsys, run_dir, *greedy)[1] == reference("Hi", 6) + "\n"
    save_model_folder(run_dir / "model", tiny_model(), raw_config(run_dir), BYTE)
    assert model_folder(run_dir) == run_dir / "model"


def test_old_folder_with_tokenizer_subfolder(folder, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    for name in ("tokenizer.json", "tokenizer_config.json", "growmem_tokenizer.json"):
        (old / name).unlink()
    BYTE.save(old / "tokenizer")
    greedy = ("--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "6")
    assert run(capsys, old, *greedy)[1] == reference("Hi", 6) + "\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-k", "-2"], "--top-k"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--seed", "x"], "--seed"),
        (["--device", "gpu"], "--device"),
        (["--prompt-file", "missing.txt"], "--prompt-file"),
        (["--prompt", "a", "--prompt-file", "p.txt"], "--prompt"),
        (["--prompt", "a" * 100, "--max-new-tokens", "65500"], "max_position_embeddings"),
    ],
)
def test_bad_arguments_are_named(folder, capsys, args, expected):
    status, out, err = run(capsys, folder, *args)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "error" in err and expected in err


def test_folders_without_model_or_tokenizer(tmp_path, capsys):
    status, _, err = run(capsys, tmp_path / "nothing")
    assert status == 2 and "RUN_OR_MODEL" in err
    status, _, err = run(capsys, tmp_path)
    assert status == 2 and "neither a model folder" in err
    mqar = tmp_path / "mqar"
    save_model_folder(mqar, tiny_model(32), raw_config(tmp_path))  # works on ids
    status, _, err = run(capsys, mqar)
    assert status == 2 and "no tokenizer" in err and "generate" in err


def test_bpe_model(tmp_path, capsys):
    bpe = BPETokenizer.train(["hello world, hello memory. "] * 20, vocab_size=270)
    path = tmp_path / "model"
    save_model_folder(path, tiny_model(bpe.vocab_size), raw_config(tmp_path), bpe)
    model, tokenizer = load_for_generation(path)
    out = io.StringIO()
    result = generate_text(model, tokenizer, "hello", max_new_tokens=10, temperature=0, out=out)
    assert out.getvalue() == result.text and tokenizer.fingerprint() == bpe.fingerprint()


def test_the_tiny_lm_preset_trains_then_generates_loads_and_plots(tmp_path, capsys):
    """The README's path from a run to text: growmem train lm_tiny (a few steps here), growmem
    generate (greedy: the model's own generate), the Auto classes on the model folder, and
    growmem plot of the run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "lm_tiny"
    settings = ["train.steps=4", "train.eval_every=4", "task.eval_blocks=2", "train.progress=false"]
    args = ["train", "lm_tiny", "--set", f"train.out_dir={out}"]
    assert main([*args, *(x for s in settings for x in ("--set", s))]) == 0
    capsys.readouterr()
    status, text, _ = run(
        capsys, out, "--prompt", "def ", "--temperature", 0, "--max-new-tokens", 12
    )
    assert status == 0
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer("def ").input_ids]])
    expected = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
    )
    new = expected[0, ids.shape[1] :]
    new = (
        new[: (new == tokenizer.eos_token_id).nonzero()[0, 0]]
        if tokenizer.eos_token_id in new
        else new
    )
    assert text.rstrip("\n") == tokenizer.decode(new)
    assert main(["plot", str(out), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 0
