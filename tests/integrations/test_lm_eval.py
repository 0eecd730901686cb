"""The lm-evaluation-harness adapter against the model itself, on a tiny random byte model and
local toy tasks (no hub). Skipped when lm-eval is not installed."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's Hugging Face backend

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from growmem import GrowMemConfig, GrowMemForCausalLM
from growmem.integrations.lm_eval import GrowMemLM
from growmem.tasks import BPETokenizer, ByteTokenizer

BYTE = ByteTokenizer()
REPO = Path(__file__).resolve().parents[2]


def tiny_model(vocab_size: int = BYTE.vocab_size) -> GrowMemForCausalLM:
    """1 layer, width 16, segments of 4 tokens; init scale 0.3 so that greedy text varies."""
    torch.manual_seed(0)
    config = GrowMemConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_heads=2,
        memory={"caching": {"segment_size": 4}},
        initializer_range=0.3,
    )
    return GrowMemForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval") / "model"
    tiny_model().save_pretrained(folder)
    BYTE.save(folder)  # the Hugging Face tokenizer files, as growmem train writes them
    return folder


@pytest.fixture(scope="module")
def lm(model_dir) -> GrowMemLM:
    return GrowMemLM(pretrained=str(model_dir), batch_size=2, device="cpu")


def direct_logprobs(model: GrowMemForCausalLM, ids: list[int]) -> torch.Tensor:
    """log p(ids[t + 1] | ids[: t + 1]) for every t, from one unbatched forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_registered_as_growmem():
    assert get_model("growmem") is GrowMemLM


def test_loglikelihood_matches_model_logits(lm, model_dir):
    model = GrowMemForCausalLM.from_pretrained(model_dir).eval()
    pairs = [
        ("Hello", " world"),
        ("abc", "d"),
        ("The memory grows", " with the context"),
        ("", "xyz"),
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    assert len(results) == len(pairs)
    for (context, continuation), (logprob, greedy) in zip(pairs, results, strict=True):
        # an empty context conditions on eos, the token before every training document
        context_ids = BYTE.encode(context) or [BYTE.eos_id]
        cont_ids = BYTE.encode(continuation)
        ids = context_ids + cont_ids
        expected = direct_logprobs(model, ids)[len(context_ids) - 1 :]
        # float32 sums of up to 17 terms, in another order than the harness's
        assert logprob == pytest.approx(expected.sum().item(), rel=1e-6, abs=1e-5)
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0]
        argmax = logits[len(context_ids) - 1 : -1].argmax(-1).tolist()
        assert greedy == (argmax == cont_ids)


def test_loglikelihood_rolling_scores_every_token_after_eos(lm, model_dir):
    model = GrowMemForCausalLM.from_pretrained(model_dir).eval()
    text = "Memory caching keeps a checkpoint of the state at every segment."
    (result,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    expected = direct_logprobs(model, [BYTE.eos_id, *BYTE.encode(text)]).sum().item()
    assert result == pytest.approx(expected, abs=1e-4)


@torch.no_grad()
def greedy_without_cache(model: GrowMemForCausalLM, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation of ``ids``, a full forward per token (no cache, no generate), ending
    before eos."""
    out: list[int] = []
    for _ in range(steps):
        token = int(model(torch.tensor([ids + out]), use_cache=False).logits[0, -1].argmax())
        if token == BYTE.eos_id:
            break
        out.append(token)
    return out


def test_generate_until_matches_greedy_decoding(lm, model_dir):
    model = GrowMemForCausalLM.from_pretrained(model_dir).eval()
    contexts = ["Hello", "a longer context than the first", "xyz"]
    max_gen_toks = 12
    greedy = [
        BYTE.decode(greedy_without_cache(model, BYTE.encode(context), max_gen_toks))
        for context in contexts
    ]
    # the model's text depends on more than the last character of its context
    assert greedy_without_cache(model, BYTE.encode("ab c"), 6) != greedy_without_cache(
        model, BYTE.encode("xy c"), 6
    )
    stop = next(ch for ch in greedy[0][2:] if ch.isascii())  # cuts the first answer
    kwargs = {"until": [stop], "max_gen_toks": max_gen_toks, "do_sample": False}
    requests = [
        Instance("generate_until", {}, (context, dict(kwargs)), i)
        for i, context in enumerate(contexts)
    ]
    answers = lm.generate_until(requests, disable_tqdm=True)
    assert all(isinstance(answer, str) for answer in answers)
    assert answers == [text.split(stop)[0] for text in greedy]
    assert len(answers[0]) < len(greedy[0])


def write_toy_tasks(folder: Path) -> Path:
    """A multiple-choice task (loglikelihood), a perplexity task (loglikelihood_rolling) and a
    generation task (generate_until) over local JSONL data."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [
        {"question": "1 + 1 =", "choices": [" 2", " 3"], "answer": 0, "target": " 2"},
        {"question": "The sky is", "choices": [" green", " blue"], "answer": 1, "target": " blue"},
        {"question": "abc", "choices": ["d", "x"], "answer": 0, "target": "d"},
    ]
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(data)},
            "cache_dir": str(folder / "hf_cache"),
        },
        "test_split": "test",
        "doc_to_text": "{{question}}",
    }
    tasks = {
        "growmem_toy_choice": {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
        "growmem_toy_rolling": {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{question}}",
            "metric_list": [{"metric": "bits_per_byte"}],
        },
        "growmem_toy_generate": {
            "output_type": "generate_until",
            "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
            "metric_list": [
                {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
            ],
        },
    }
    for name, config in tasks.items():
        # JSON is YAML: lm_eval reads these files with its YAML loader
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **common, **config}))
    return folder


TOY_TASKS = ["growmem_toy_choice", "growmem_toy_rolling", "growmem_toy_generate"]


def test_simple_evaluate_on_local_tasks(lm, model_dir, tmp_path):
    tasks = write_toy_tasks(tmp_path / "tasks")
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=TOY_TASKS, task_manager=manager)
    choice = out["results"]["growmem_toy_choice"]["acc,none"]
    generate = out["results"]["growmem_toy_generate"]["exact_match,none"]
    assert 0.0 <= choice <= 1.0
    assert 0.0 <= generate <= 1.0
    assert out["config"]["model_num_parameters"] == lm.model.num_parameters()
    # bits per byte of the questions, each scored after eos, from the model directly
    model = GrowMemForCausalLM.from_pretrained(model_dir).eval()
    questions = [json.loads(line)["question"] for line in (tasks / "toy.jsonl").open()]
    nats = sum(-direct_logprobs(model, [BYTE.eos_id, *BYTE.encode(q)]).sum() for q in questions)
    expected = nats.item() / math.log(2) / sum(len(q.encode()) for q in questions)
    bits = out["results"]["growmem_toy_rolling"]["bits_per_byte,none"]
    assert bits == pytest.approx(expected, rel=1e-5)


def test_stock_hf_model_after_import_growmem(lm, model_dir):
    """lm_eval's own "hf" model loads a growmem folder once growmem is imported (which
    registers the architecture); with prefix_token_id=eos it scores as the adapter does."""
    stock = HFLM(pretrained=str(model_dir), prefix_token_id=BYTE.eos_id, device="cpu")
    pairs = [("Hello", " world"), ("", "xyz"), ("The memory grows", " with the context")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for (ours, our_greedy), (theirs, their_greedy) in zip(
        lm.loglikelihood(requests, disable_tqdm=True),
        stock.loglikelihood(requests, disable_tqdm=True),
        strict=True,
    ):
        assert theirs == pytest.approx(ours, abs=1e-5) and their_greedy == our_greedy
    kwargs = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    requests = [Instance("generate_until", {}, ("Hello", dict(kwargs)), 0)]
    assert stock.generate_until(requests, disable_tqdm=True) == lm.generate_until(
        requests, disable_tqdm=True
    )


def test_ruler_tasks_load_the_model_folders_tokenizer(model_dir):
    """lm_eval's RULER tasks size their prompts with AutoTokenizer.from_pretrained of the
    model folder (``pretrained=FOLDER``): it loads, and counts growmem's tokens."""
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    tokenizer = get_tokenizer(str(model_dir))
    text = "The grass is green. The sky is blue. 東京"
    assert tokenizer(text).input_ids == BYTE.encode(text)


def test_command_line_runs_local_task(model_dir, tmp_path):
    tasks = write_toy_tasks(tmp_path / "tasks")
    command = [
        sys.executable,
        "-m",
        "growmem.integrations.lm_eval",
        "--model",
        "growmem",
        "--model_args",
        f"pretrained={model_dir}",
        "--tasks",
        "growmem_toy_choice",
        "--include_path",
        str(tasks),
        "--device",
        "cpu",
        "--batch_size",
        "2",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "growmem_toy_choice" in done.stdout
    assert "acc" in done.stdout


def test_tokenizer_defaults_to_bytes_and_must_match_the_model(tmp_path):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)  # no tokenizer
    lm = GrowMemLM(pretrained=str(folder), device="cpu")
    assert lm.tok_encode("né <eos>") == BYTE.encode("né <eos>")
    assert lm.eot_token_id == lm.prefix_token_id == BYTE.eos_id
    assert lm.max_length == lm.config.max_position_embeddings
    assert GrowMemLM(pretrained=str(folder), device="cpu", prefix_token_id=7).prefix_token_id == 7
    bpe = BPETokenizer.train(["hello world, hello memory"] * 20, vocab_size=270)
    with pytest.raises(ValueError, match="tokenizer has"):
        GrowMemLM(pretrained=str(folder), tokenizer=bpe, device="cpu")


def test_loaded_model_with_bpe_tokenizer_folder(tmp_path):
    bpe = BPETokenizer.train(["hello world, hello memory"] * 20, vocab_size=270)
    bpe.save(tmp_path / "tokenizer")
    lm = GrowMemLM(pretrained=tiny_model(bpe.vocab_size), tokenizer=tmp_path / "tokenizer")
    text = "hello memory"
    assert lm.tok_encode(text) == bpe.encode(text)
    ((logprob, _),) = lm.loglikelihood([Instance("loglikelihood", {}, ("hello", " world"), 0)])
    assert logprob < 0


def test_the_tokenizer_is_the_model_folders_hugging_face_tokenizer(lm, model_dir):
    """No shim: HFLM gets a transformers tokenizer equal to AutoTokenizer's of the folder."""
    assert isinstance(lm.tokenizer, PreTrainedTokenizerBase)
    auto = AutoTokenizer.from_pretrained(model_dir)
    text = "héllo <eos> 東京"
    assert lm.tokenizer(text)["input_ids"] == auto(text)["input_ids"] == BYTE.encode(text)
    ids = [104, BYTE.eos_id, 105, BYTE.pad_id]
    assert lm.tokenizer.decode(ids) == auto.decode(ids) == "h<eos>i<pad>"
    assert lm.tok_decode(ids) == "hi"  # HFLM drops special tokens


def test_a_model_folder_brings_its_own_tokenizer(tmp_path):
    bpe = BPETokenizer.train(["hello world, hello memory"] * 20, vocab_size=270)
    folder = tmp_path / "model"
    tiny_model(bpe.vocab_size).save_pretrained(folder)
    bpe.save(folder / "tokenizer")  # the layout before Hugging Face tokenizers
    lm = GrowMemLM(pretrained=str(folder), device="cpu")  # no tokenizer argument
    assert lm.tok_encode("hello memory") == bpe.encode("hello memory")
    assert lm.eot_token_id == bpe.eos_id
    bpe.save(folder)  # today's layout
    shutil.rmtree(folder / "tokenizer")
    lm = GrowMemLM(pretrained=str(folder), device="cpu")
    assert lm.tok_encode("hello memory") == bpe.encode("hello memory")


def test_mixed_precision_dtype_runs_the_model_under_autocast(lm, model_dir):
    ids = torch.tensor([BYTE.encode("Hello")])
    bf16 = GrowMemLM(pretrained=str(model_dir), device="cpu", mixed_precision_dtype="bfloat16")
    assert lm._model_call(ids).dtype == torch.float32
    assert bf16._model_call(ids).dtype == torch.bfloat16


def eos_after_bang_model() -> GrowMemForCausalLM:
    """A tiny untied model that predicts eos right after "!" and never elsewhere, and never
    predicts "!": residual
    dimension 0 holds only the input embedding, nonzero for "!" alone, and eos's logit reads
    only that dimension."""
    torch.manual_seed(0)
    config = GrowMemConfig(
        vocab_size=BYTE.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_heads=2,
        memory={"caching": {"segment_size": 4}},
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    model = GrowMemForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.0
        model.model.embed_tokens.weight[ord("!"), 0] = 5.0
        for block in model.model.layers:
            block.mixer.o_proj.weight[0] = 0.0
            block.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[BYTE.eos_id] = 0.0
        model.lm_head.weight[BYTE.eos_id, 0] = 50.0
        # "!" itself is never generated (its logit is 0, or -50 after "!"): the eos a row
        # generates comes from its prompt alone, whatever the random weights
        model.lm_head.weight[ord("!")] = 0.0
        model.lm_head.weight[ord("!"), 0] = -50.0
    return model


def test_generate_until_ends_a_row_at_eos_while_others_go_on():
    """In a batch, a row that generates eos ends there: the tokens generated after it (while the
    other rows go on) never reach its answer."""
    model = eos_after_bang_model()
    contexts, max_gen_toks = ["Hello!", "xyz"], 10
    greedy = [greedy_without_cache(model, BYTE.encode(c), max_gen_toks) for c in contexts]
    # the first row ends at once, the second runs to max_gen_toks
    assert greedy[0] == [] and len(greedy[1]) == max_gen_toks
    assert greedy_without_cache(model, BYTE.encode("Hello! "), 3) != []  # eos only after "!"
    lm = GrowMemLM(pretrained=model, batch_size=2, device="cpu")
    kwargs = {"until": ["never said"], "max_gen_toks": max_gen_toks, "do_sample": False}
    requests = [
        Instance("generate_until", {}, (context, dict(kwargs)), i)
        for i, context in enumerate(contexts)
    ]
    answers = lm.generate_until(requests, disable_tqdm=True)
    expected = [BYTE.decode(tokens) for tokens in greedy]
    assert answers == expected and "never said" not in expected[1]
