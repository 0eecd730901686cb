"""The ``growmem`` command: train, evaluate and generate text with models.

growmem train CONFIG [--model SPEC] [--set section.key=value ...] [--resume | --auto-resume]
growmem eval MODEL_DIR [--task mqar|niah|lm] [--lengths N ...] [--kv-pairs K ...]
             [--post-training-mc SEGMENT] [--device DEVICE]
growmem generate RUN_OR_MODEL [--prompt TEXT | --prompt-file PATH] [--max-new-tokens N]
             [--temperature T] [--top-k K] [--top-p P] [--seed S] [--device DEVICE] [--stats]
growmem plot RUN [RUN ...] [--out curves.png]
growmem configs

CONFIG is a YAML file or a task base (mqar, niah, lm); SPEC names the model trained on it:
transformer, or RULE[+AGGREGATION][@SEGMENTS] such as gated_delta+grm, titans+ssc@32 or
gated_delta+loglinear@log (growmem.models.model_spec).

Errors in what it is given (a config, a folder, a damaged file, a full disk) are reported on
one line, ``growmem COMMAND: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from growmem.utils.denormals import flushed_denormals

CONFIGS = Path(__file__).resolve().parent / "configs"


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def resolve_config(name: str) -> Path:
    """A config path, or the name of a task base in growmem/configs (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    if preset.is_file():
        return preset
    raise FileNotFoundError(
        f"config not found: {name} (neither a file nor a task base; `growmem configs` lists them)"
    )


def model_spec(text: str) -> str:
    """An argparse type: a model spec, checked (the error lists the rules and aggregations)."""
    from growmem.models.model_spec import ModelSpec

    try:
        return str(ModelSpec.parse(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run_config(args):
    """The RunConfig that ``growmem train`` with the parsed ``args`` trains."""
    from growmem.training.config import load_config

    path = resolve_config(args.config)
    return load_config(path, args.set, presets=CONFIGS, model=args.model)


def cmd_train(args) -> int:
    from growmem.train import Distributed, train

    config = run_config(args)
    resume = "auto" if args.auto_resume else args.resume
    final = train(config, resume=resume, stop_after=args.stop_after)
    if not Distributed.main_process():  # under torchrun, rank 0 speaks for the run
        return 0
    if final is None:
        print(f"stopped after step {args.stop_after}; continue with --resume")
    else:
        print(f"model saved to {final}")
    return 0


def cmd_eval(args) -> int:
    from growmem.evaluate import (
        evaluate_lm,
        evaluate_mqar,
        evaluate_niah,
        mqar_gate_routing,
        niah_eval_examples,
        niah_gate_routing,
        plot_results,
    )
    from growmem.models import GrowMemConfig, GrowMemForCausalLM
    from growmem.models.model_spec import spec_of
    from growmem.training.checkpoint import (
        CONFIG_FILE,
        load_folder_tokenizer,
        load_weights,
        read_run_config,
        verify_checksums,
    )
    from growmem.training.config import TASK_TYPES, build_config
    from growmem.training.data import (
        lm_eval_blocks,
        mqar_data,
        niah_eval_lengths,
        niah_eval_needles,
    )
    from growmem.training.device import resolve_device
    from growmem.training.documents import DocumentResets
    from growmem.training.rundir import ensure_folder
    from growmem.utils.provenance import write_json

    folder = Path(args.model)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    device = resolve_device(args.device, "--device")
    recorded = read_run_config(folder)
    run = build_config({k: recorded[k] for k in ("model", "task", "train")})
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: not a complete model folder")
    verify_checksums(folder, [CONFIG_FILE])
    config = GrowMemConfig.from_pretrained(folder)
    label = ""
    if args.post_training_mc is not None:
        if config.memory is None:
            raise ValueError("--post-training-mc needs memory layers; the model has none")
        caching = dataclasses.replace(
            config.memory.caching,
            aggregation="mean",
            segment_size=args.post_training_mc,
            segments=None,
        )
        config.memory = dataclasses.replace(config.memory, caching=caching)
        label = f"-mc{args.post_training_mc}"
    model = GrowMemForCausalLM(config)
    load_weights(folder, model)
    model.to(device).eval()

    task_name = args.task or run.task.name
    if args.kv_pairs and task_name != "mqar":
        raise ValueError(f"--kv-pairs applies to the mqar task, not {task_name}")
    if args.data_seed is not None and task_name == "lm":
        raise ValueError("--data-seed applies to the mqar and niah tasks, not lm")
    task = run.task if task_name == run.task.name else TASK_TYPES[task_name]()
    tokenizer = None
    if task_name in ("niah", "lm"):
        tokenizer = load_folder_tokenizer(folder, config.vocab_size, f"task {task_name}")
    lengths = args.lengths
    if lengths and max(lengths) > config.max_position_embeddings:
        raise ValueError(
            f"--lengths up to {max(lengths)} exceed the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    out = ensure_folder(args.out or folder, "--out")
    data_seed = run.train.seed if args.data_seed is None else args.data_seed
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if task_name == "mqar":
        if lengths:
            task = dataclasses.replace(task, test_seq_lens=lengths)
        if args.kv_pairs:
            task = dataclasses.replace(task, test_num_kv_pairs=args.kv_pairs)
        if task.vocab_size != config.vocab_size:
            raise ValueError(f"MQAR vocab {task.vocab_size} != model vocab {config.vocab_size}")
        slices = mqar_data(task, data_seed).mqar_test
        results = evaluate_mqar(model, slices)
        routing = mqar_gate_routing(model, slices)  # None without gates
        if routing is not None:
            results["gates"] = routing
    elif task_name == "niah":
        lengths = lengths or niah_eval_lengths(task)
        results = evaluate_niah(
            model,
            tokenizer,
            variant=task.variant,
            lengths=lengths,
            num_examples=task.num_eval_examples,
            seed=data_seed,
            haystack=task.haystack,
            num_needles=niah_eval_needles(task),
            train_length=run.task.seq_len,
        )
        # the gates' routing on the same examples, within the training length (drawn lazily:
        # a model without gates reads none)
        within = [n for n in lengths if n <= run.task.seq_len]
        examples = (
            e
            for n in within
            for e in niah_eval_examples(
                tokenizer,
                task.variant,
                n,
                task.num_eval_examples,
                data_seed,
                task.haystack,
                niah_eval_needles(task),
            )
        )
        routing = niah_gate_routing(model, examples) if within else None  # None: no gates
        if routing is not None:
            results["gates"] = {"lengths": within, **routing}
    else:
        seq_len = max(lengths) if lengths else task.seq_len
        max_blocks = args.max_blocks or task.eval_blocks
        eval_task = dataclasses.replace(task, seq_len=seq_len, eval_blocks=max_blocks)
        blocks = lm_eval_blocks(eval_task, tokenizer)
        if task.reset_at_documents:  # read as the run trained: each document alone
            model = DocumentResets(model, tokenizer.eos_id)
        results = evaluate_lm(model, blocks, max_blocks=max_blocks)
    name = f"eval-{task_name}{label}"
    path = write_json(out / f"{name}.json", results)
    plot = plot_results(task_name, results, out / f"{name}.png", title=f"{folder.name}{label}")
    summary = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    print(json.dumps(summary))
    print(f"wrote {path} and {plot} (model {spec_of(config)})")
    return 0


def cmd_generate(args) -> int:
    from growmem.generate import check_sampling, generate_text, load_for_generation, read_prompt
    from growmem.training.device import resolve_device

    check_sampling(args.temperature, args.top_k, args.top_p)
    device = resolve_device(args.device, "--device")
    model, tokenizer = load_for_generation(args.run_or_model, device)
    prompt = read_prompt(args.prompt, args.prompt_file)  # once all else is known to be right
    result = generate_text(
        model,
        tokenizer,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        out=sys.stdout,
    )
    print()
    if args.stats:
        print(result.stats(), file=sys.stderr)
    return 0


def cmd_plot(args) -> int:
    from growmem.training.curves import plot_runs

    plot_runs(args.runs, args.out, smoothing=args.smoothing)
    print(f"wrote {args.out}")
    return 0


def number_in(low: float, below: float | None = None):
    """An argparse type: a number >= ``low`` (and < ``below`` when given)."""
    wanted = f">= {low:g}" if below is None else f"in [{low:g}, {below:g})"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        # (NaN fails too)
        if value is None or not value >= low or (below is not None and not value < below):
            raise argparse.ArgumentTypeError(f"expected a number {wanted}, got {text!r}")
        return value

    return parse


def cmd_configs(_args) -> int:
    from growmem.models.model_spec import GRAMMAR

    for path in sorted(CONFIGS.glob("*.yaml")):
        print(path.stem)
    print(f"model specs (growmem train BASE --model SPEC): {GRAMMAR}")
    return 0


def build_parser() -> Parser:
    """The command line parser of ``growmem``."""
    parser = Parser(prog="growmem", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser(
        "train",
        help="train a model from a YAML config or a task base",
        description="Train a model: growmem train mqar --model gated_delta+grm",
    )
    p.add_argument("config", help="a YAML file or a task base: mqar, niah, lm (growmem configs)")
    p.add_argument(
        "--model",
        type=model_spec,
        metavar="SPEC",
        help="the model: transformer, or RULE[+AGGREGATION][@SEGMENTS] such as gated_delta, "
        "gated_delta+grm, titans+ssc@32, gated_delta+loglinear@log, swla+grm@8,8,16 (default: "
        "the config's model; its per_model settings for the model's family apply; the run "
        "folder gets the spec as a suffix)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set train.steps=200",
    )
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    resume.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue when out_dir has a checkpoint, else start (over)",
    )
    p.add_argument(
        "--stop-after",
        type=int_at_least(1),
        metavar="STEP",
        help="end the session after STEP with a checkpoint (continue later with --resume)",
    )
    p.set_defaults(run=cmd_train)

    p = commands.add_parser(
        "eval",
        help="evaluate a saved model folder",
        description="Evaluate a saved model folder of any model spec (printed at the end).",
    )
    p.add_argument("model", help="a model folder (RUN/model) or a checkpoint folder")
    p.add_argument("--task", choices=["mqar", "niah", "lm"], help="default: the run's task")
    p.add_argument(
        "--lengths", type=int_at_least(1), nargs="+", help="sequence lengths to evaluate at"
    )
    p.add_argument(
        "--kv-pairs",
        type=int_at_least(1),
        nargs="+",
        help="mqar: key-value pairs to test with (slices need length >= 4 * pairs)",
    )
    p.add_argument(
        "--post-training-mc",
        type=int_at_least(1),
        metavar="SEGMENT",
        help="read the memory through Memory Caching at inference only: the model's spec "
        "becomes RULE+mean@SEGMENT (uniform mean over segments of SEGMENT tokens)",
    )
    p.add_argument(
        "--data-seed",
        type=int_at_least(0),
        help="mqar, niah: generator seed of the evaluation examples (default: the run's "
        "seed, whose test stream is disjoint from its training stream); a seed no training "
        "used gives every model the same held-out examples",
    )
    p.add_argument(
        "--max-blocks", type=int_at_least(0), default=0, help="lm: blocks to score (0: task's)"
    )
    p.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0: default)")
    p.add_argument(
        "--device",
        default="auto",
        help="where to evaluate: auto (cuda if available, else cpu), cpu, cuda, cuda:N, ...",
    )
    p.add_argument("--out", help="folder for eval-*.json and .png (default: the model folder)")
    p.set_defaults(run=cmd_eval)

    from growmem.training.model_card import GENERATION_DEFAULTS as DEFAULTS

    p = commands.add_parser(
        "generate",
        help="continue a prompt with a trained model, streaming the text",
        description="Continue a prompt with a trained model; the new text is written as it is "
        "produced (the prompt is read as the start of a document).",
    )
    p.add_argument(
        "run_or_model",
        metavar="RUN_OR_MODEL",
        help="a run folder (its model/, else its latest checkpoint), a model or checkpoint folder",
    )
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt",
        help='the text to continue; "-": read it from standard input (the default when '
        "standard input is piped; else the model writes from scratch)",
    )
    prompt.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file")
    p.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        default=DEFAULTS["max_new_tokens"],
        metavar="N",
        help="stop after N new tokens (or at eos; default %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=number_in(0),
        default=DEFAULTS["temperature"],
        help="sampling temperature; 0: greedy decoding (default %(default)s)",
    )
    p.add_argument(
        "--top-k",
        type=int_at_least(0),
        default=DEFAULTS["top_k"],
        help="sample among the K likeliest tokens; 0: all (default %(default)s)",
    )
    p.add_argument(
        "--top-p",
        type=number_in(0),
        default=1.0,
        help="sample among the likeliest tokens of total probability P, in (0, 1] "
        "(default %(default)s: all)",
    )
    p.add_argument("--seed", type=int_at_least(0), help="seed of the sampling (default: random)")
    p.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N"
    )
    p.add_argument(
        "--stats",
        action="store_true",
        help="print the speed (tokens/s) and the cache's bytes (cached segments, online "
        "state, attention) to standard error at the end",
    )
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser(
        "plot",
        help="draw the loss and evaluation curves of runs into a PNG",
        description="Draw the training loss (smoothed, raw faint) and the evaluation curves "
        "(accuracy or evaluation loss, per slice where there are several) of one or several "
        "runs from their metrics.jsonl.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (train.out_dir)")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default: curves.png)")
    p.add_argument(
        "--smoothing",
        type=number_in(0, below=1),
        default=0.9,
        help="weight of the training loss's moving average, in [0, 1) (default: 0.9)",
    )
    p.set_defaults(run=cmd_plot)

    p = commands.add_parser("configs", help="list the task bases and the model spec grammar")
    p.set_defaults(run=cmd_configs)

    from growmem.probe import command as probe  # it builds on this module's argument types

    p = commands.add_parser("probe", help="measure a memory before any training")
    probes = p.add_subparsers(dest="probe", required=True)
    p = probes.add_parser(
        "capacity",
        help="recall against key-value pairs: base, uniform, oracle, grm, ssc (no training)",
        description=probe.DESCRIPTION,
    )
    probe.add_arguments(p)
    p.set_defaults(run=probe.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with flushed_denormals():  # as train does: subnormal floats are slow on CPUs
            return args.run(args)
    except (ValueError, OSError) as error:
        # bad input or a file system that refuses (missing, read-only, full): one line
        message = " ".join(str(error).split())
        print(f"growmem {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
