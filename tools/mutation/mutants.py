"""The catalogue of planted bugs in growmem's user-facing modules (models, layers, training,
evaluation, tasks, integrations; the ops have their own mutation audit).

Each mutant is one plausible one-line bug, the kind a careful reviewer would plant: an
off-by-one, a flipped sign, a wrong axis or default, a dropped mask, a swapped argument. Most
change results silently rather than crash. ``tools/mutation/run.py`` applies each one to a
copy of the repository and runs its test paths; tests/test_mutation_catalogue.py checks that
every ``original`` still occurs exactly once in its file, so the catalogue cannot rot silently
when the code moves.

A mutant whose behaviour no user can observe is marked ``equivalent`` (with the reason) and is
left out of the kill rate.
"""

from __future__ import annotations

from dataclasses import dataclass

AREAS = ("models", "layers", "training", "evaluation", "tasks", "integrations")

# Test paths that exercise each area (folders, so that tests added later are picked up).
MODELS_TESTS = ("tests/models", "tests/layers", "tests/training")
LAYERS_TESTS = ("tests/layers", "tests/models", "tests/training")
TRAINING_TESTS = ("tests/training", "tests/test_demo.py")
EVALUATION_TESTS = ("tests/training", "tests/test_demo.py")
TASKS_TESTS = ("tests/tasks", "tests/training")
INTEGRATIONS_TESTS = ("tests/integrations",)


@dataclass(frozen=True)
class Mutant:
    """One planted bug.

    Attributes:
        id: unique, ``<area>/<slug>``.
        area: one of ``AREAS``.
        file: the mutated file, relative to the repository root.
        original: an exact snippet of ``file`` that occurs there exactly once.
        replacement: what replaces it (the bug).
        description: the plausible bug, in one line.
        tests: pytest paths (files or folders) that exercise the code.
        equivalent: why no observable behaviour changes, or None for a real bug.
    """

    id: str
    area: str
    file: str
    original: str
    replacement: str
    description: str
    tests: tuple[str, ...]
    equivalent: str | None = None


def _models(slug, file, original, replacement, description, tests=MODELS_TESTS, **kw):
    return Mutant(f"models/{slug}", "models", file, original, replacement, description, tests, **kw)


def _layers(slug, file, original, replacement, description, tests=LAYERS_TESTS, **kw):
    return Mutant(f"layers/{slug}", "layers", file, original, replacement, description, tests, **kw)


def _training(slug, file, original, replacement, description, tests=TRAINING_TESTS, **kw):
    return Mutant(
        f"training/{slug}", "training", file, original, replacement, description, tests, **kw
    )


def _evaluation(slug, original, replacement, description, tests=EVALUATION_TESTS, **kw):
    return Mutant(
        f"evaluation/{slug}",
        "evaluation",
        "growmem/evaluate.py",
        original,
        replacement,
        description,
        tests,
        **kw,
    )


def _tasks(slug, file, original, replacement, description, tests=TASKS_TESTS, **kw):
    return Mutant(f"tasks/{slug}", "tasks", file, original, replacement, description, tests, **kw)


def _integrations(slug, original, replacement, description, tests=INTEGRATIONS_TESTS, **kw):
    return Mutant(
        f"integrations/{slug}",
        "integrations",
        "growmem/integrations/lm_eval.py",
        original,
        replacement,
        description,
        tests,
        **kw,
    )


MODELING = "growmem/models/modeling.py"
CACHE = "growmem/models/cache.py"
CONFIGURATION = "growmem/models/configuration.py"
LAYER_CONFIG = "growmem/layers/config.py"
MC_ATTENTION = "growmem/layers/mc_attention.py"
ATTENTION = "growmem/layers/attention.py"
TRAIN = "growmem/train.py"
CONFIG = "growmem/training/config.py"
CONFIG_FILES = "growmem/training/config_files.py"
DATA = "growmem/training/data.py"
CHECKPOINT = "growmem/training/checkpoint.py"
RUNDIR = "growmem/training/rundir.py"
DEVICE = "growmem/training/device.py"
MQAR = "growmem/tasks/mqar.py"
NIAH = "growmem/tasks/niah.py"
CORPUS = "growmem/tasks/corpus.py"
TOKENIZERS = "growmem/tasks/tokenizers.py"
SAMPLING = "growmem/tasks/sampling.py"

MUTANTS: tuple[Mutant, ...] = (
    # ---------------------------------------------------------------- models
    _models(
        "block-mlp-reads-mixer-norm",
        MODELING,
        "return x + self.mlp(self.mlp_norm(x)), cache",
        "return x + self.mlp(self.mixer_norm(x)), cache",
        "the SwiGLU branch normalises with the mixer's RMSNorm weights (copy-paste)",
    ),
    _models(
        "residual-init-std",
        MODELING,
        "std = std / math.sqrt(2 * self.config.num_hidden_layers)",
        "std = std / math.sqrt(self.config.num_hidden_layers)",
        "residual-output projections' init std divided by sqrt(L) instead of sqrt(2L)",
    ),
    _models(
        "padding-output-not-zeroed",
        MODELING,
        "hidden_states = hidden_states * mask[..., None]",
        "hidden_states = hidden_states",
        "the final hidden states at padding are no longer zeroed (dropped mask)",
    ),
    _models(
        "loss-unshifted-labels",
        MODELING,
        "labels[:, 1:].flatten().to(logits.device),",
        "labels[:, :-1].flatten().to(logits.device),",
        "the LM loss compares position t with label t (no shift): it trains the identity",
    ),
    _models(
        "loss-ignores-num-items",
        MODELING,
        'reduction="mean" if num_items_in_batch is None else "sum",',
        'reduction="mean",',
        "with num_items_in_batch the mean is divided again (gradient accumulation shrinks it)",
    ),
    _models(
        "mask-takes-first-columns",
        MODELING,
        "return padding_mask(attention_mask[:, -T:], B, T, attention_mask.device)",
        "return padding_mask(attention_mask[:, :T], B, T, attention_mask.device)",
        "a [B, past + T] mask is cut to its first T columns, not the new tokens' last T",
    ),
    _models(
        "logits-to-keep-first",
        MODELING,
        "hidden_states = hidden_states[:, -logits_to_keep:]",
        "hidden_states = hidden_states[:, :logits_to_keep]",
        "logits_to_keep keeps the first positions instead of the last (generate's prefill)",
    ),
    _models(
        "cache-forgets-past-length",
        MODELING,
        "cache.seen_tokens = past + T",
        "cache.seen_tokens = T",
        "the cache's length counts only the last call's tokens",
    ),
    _models(
        "repeat-interleave-tiles",
        CACHE,
        "torch.arange(self.batch_size).repeat_interleave(repeats)",
        "torch.arange(self.batch_size).repeat(repeats)",
        "batch_repeat_interleave tiles the rows ([a, b, a, b]) instead of repeating each",
        tests=("tests/models",),
    ),
    _models(
        "reset-keeps-length",
        CACHE,
        "self.layers = [None] * len(self.layers)\n        self.seen_tokens = 0",
        "self.layers = [None] * len(self.layers)",
        "reset() forgets the layers' states but keeps the token count",
        tests=("tests/models",),
    ),
    _models(
        "hybrid-layers-ignored",
        CONFIGURATION,
        "return self.memory is None or layer_idx in self.attn_layers",
        "return self.memory is None and layer_idx in self.attn_layers",
        "attn_layers of a hybrid are silently memory layers",
    ),
    _models(
        "ssc-top-k-default",
        LAYER_CONFIG,
        "caching: Caching = field(default_factory=Caching)",
        "caching: Caching = field(default_factory=lambda: Caching(top_k=1))",
        "the default top-k of ssc is 1 instead of the documented 2",
    ),
    # ---------------------------------------------------------------- layers
    _layers(
        "dt-bias-sign",
        MC_ATTENTION,
        "dt = F.softplus(_at_least_fp32(self.a_proj(x)) + self.dt_bias)",
        "dt = F.softplus(_at_least_fp32(self.a_proj(x)) - self.dt_bias)",
        "the dt bias enters with the wrong sign",
    ),
    _layers(
        "decay-rate-not-exponentiated",
        MC_ATTENTION,
        'gates["g"] = -self.A_log.exp() * dt',
        'gates["g"] = -self.A_log * dt',
        "the decay rate uses A_log itself, not A = exp(A_log)",
    ),
    _layers(
        "beta-softplus",
        MC_ATTENTION,
        'gates["beta"] = torch.sigmoid(_at_least_fp32(self.b_proj(x)))',
        'gates["beta"] = F.softplus(_at_least_fp32(self.b_proj(x)))',
        "the write strength beta is a softplus (unbounded) instead of a sigmoid",
    ),
    _layers(
        "lambda-from-beta-projection",
        MC_ATTENTION,
        'gates["lam"] = torch.sigmoid(_at_least_fp32(self.l_proj(x)))',
        'gates["lam"] = torch.sigmoid(_at_least_fp32(self.b_proj(x)))',
        "swla's lambda is computed from beta's projection (copy-paste)",
    ),
    _layers(
        "keys-not-normalised",
        MC_ATTENTION,
        "q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)",
        "q, k = F.normalize(q, dim=-1), k",
        "qk_norm normalises the queries only, the keys stay raw",
    ),
    _layers(
        "eta-max-dropped",
        MC_ATTENTION,
        'gates["eta"] = self.config.eta_max * torch.sigmoid(_at_least_fp32(self.eta_proj(x)))',
        'gates["eta"] = torch.sigmoid(_at_least_fp32(self.eta_proj(x)))',
        "the deep rules' inner learning rate is not bounded by eta_max",
    ),
    _layers(
        "output-gate-reads-u",
        MC_ATTENTION,
        "out_gate = rest[..., -inner:].reshape(g, n, H, D)",
        "out_gate = rest[..., :inner].reshape(g, n, H, D)",
        "the output gate reads the gate-query channels u (gated aggregations)",
    ),
    _layers(
        "dt-bias-init-not-inverted",
        MC_ATTENTION,
        'values["dt_bias"] = dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)',
        'values["dt_bias"] = dt',
        "dt_bias is initialised to dt instead of softplus^-1(dt) (time steps ~0.7, not 1e-3..0.1)",
    ),
    _layers(
        "rope-frequency-sign",
        ATTENTION,
        "inv_freq = theta**-exponent  # [dim // 2]",
        "inv_freq = theta**exponent  # [dim // 2]",
        "RoPE frequencies grow with the dimension instead of shrinking",
    ),
    _layers(
        "window-off-by-one",
        ATTENTION,
        "allowed = allowed & (gap < self.window)",
        "allowed = allowed & (gap <= self.window)",
        "the sliding window admits window + 1 tokens",
    ),
    _layers(
        "short-conv-taps-shifted",
        "growmem/layers/conv.py",
        "y = y + xs[:, j : j + T] * weight[:, 0, j]",
        "y = y + xs[:, j + 1 : j + 1 + T] * weight[:, 0, j]",
        "the few-token conv path (decoding) reads every tap one position late",
    ),
    _layers(
        "rmsnorm-sum-not-mean",
        "growmem/layers/norm.py",
        "y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)",
        "y = y * torch.rsqrt(y.pow(2).sum(-1, keepdim=True) + self.eps)",
        "RMSNorm divides by the root of the sum of squares, not of their mean",
    ),
    _layers(
        "output-gate-sigmoid",
        "growmem/layers/norm.py",
        "return super().forward(x) * F.silu(gate)",
        "return super().forward(x) * torch.sigmoid(gate)",
        "the output gate is a sigmoid instead of SiLU",
    ),
    _layers(
        "swiglu-gelu",
        "growmem/layers/mlp.py",
        "return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))",
        "return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))",
        "the channel mixer is GeGLU instead of SwiGLU",
    ),
    # ---------------------------------------------------------------- training
    _training(
        "warmup-starts-at-zero",
        TRAIN,
        "return (step + 1) / warmup",
        "return step / warmup",
        "warmup's first step has learning rate 0",
    ),
    _training(
        "cosine-floor-dropped",
        TRAIN,
        "return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))",
        "return (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))",
        "the cosine decays to 0 instead of min_lr_ratio",
    ),
    _training(
        "cosine-progress-from-zero",
        TRAIN,
        "progress = min(1.0, (step - warmup) / max(1, total - warmup))",
        "progress = min(1.0, step / max(1, total - warmup))",
        "cosine progress counts from step 0, not from the end of warmup",
    ),
    _training(
        "decay-on-tensors",
        TRAIN,
        'is_matrix = p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name',
        'is_matrix = p.dim() >= 2 and "embed_tokens" not in name and "lm_head" not in name',
        "weight decay also on conv taps and the deep memories' initial weights (3-D)",
    ),
    _training(
        "decay-on-embeddings",
        TRAIN,
        'is_matrix = p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name',
        'is_matrix = p.dim() == 2 and "lm_head" not in name',
        "weight decay on the (tied) embedding",
    ),
    _training(
        "no-gradient-clipping",
        TRAIN,
        'clip = settings.grad_clip if settings.grad_clip > 0 else float("inf")',
        'clip = float("inf")',
        "train.grad_clip is ignored: gradients are never clipped",
    ),
    _training(
        "train-loss-unshifted",
        TRAIN,
        "mb_labels[:, 1:].flatten(),",
        "mb_labels[:, :-1].flatten(),",
        "the training loss compares position t with label t (no shift)",
    ),
    _training(
        "last-step-not-logged",
        TRAIN,
        "if done % settings.log_every == 0 or done == settings.steps:",
        "if done % settings.log_every == 0:",
        "the final step is not logged when steps is not a multiple of log_every",
    ),
    _training(
        "int-not-made-float",
        CONFIG,
        "return float(value)",
        "return value",
        "an int given for a float setting stays an int",
    ),
    _training(
        "base-overrides-file",
        CONFIG_FILES,
        "merged[key] = merge(merged[key], value)",
        "merged[key] = merge(value, merged[key])",
        "a base config's keys override the file that names it",
    ),
    _training(
        "min-lr-ratio-unbounded",
        CONFIG,
        '_check_range("train.min_lr_ratio", train.min_lr_ratio, 0.0, 1.0)',
        '_check_range("train.min_lr_ratio", train.min_lr_ratio, 0.0)',
        "a min_lr_ratio above 1 is accepted",
    ),
    _training(
        "mqar-slice-bound-strict",
        DATA,
        "if 4 * k <= T",
        "if 4 * k < T",
        "an MQAR test slice with seq_len = 4 * num_kv_pairs is dropped",
        tests=("tests/training", "tests/tasks"),
    ),
    _training(
        "niah-train-on-prompt-dropped",
        DATA,
        "examples, pad_id=tokenizer.pad_id, train_on_prompt=task.train_on_prompt",
        "examples, pad_id=tokenizer.pad_id, train_on_prompt=False",
        "task.train_on_prompt never reaches the training batch",
    ),
    _training(
        "niah-default-lengths",
        DATA,
        "return task.eval_lengths or [task.seq_len * m for m in (1, 2, 4, 8)]",
        "return task.eval_lengths or [task.seq_len * m for m in (1, 2, 4)]",
        "the default NIAH evaluation lengths stop at 4x instead of 8x",
    ),
    _training(
        "lm-eval-split-ignored",
        DATA,
        "documents = load_corpus(task.corpus, task.eval_split)",
        'documents = load_corpus(task.corpus, "val")',
        "task.eval_split is ignored: evaluation always reads the val split",
    ),
    _training(
        "keeps-one-checkpoint-fewer",
        CHECKPOINT,
        "for old in checkpoints[: max(0, len(checkpoints) - keep)]:",
        "for old in checkpoints[: max(0, len(checkpoints) - keep + 1)]:",
        "keep_checkpoints keeps one checkpoint fewer than asked",
    ),
    _training(
        "weights-checksum-wrong-file",
        CHECKPOINT,
        "verify_checksums(folder, [WEIGHTS_FILE])",
        "verify_checksums(folder, [STATE_FILE])",
        "load_weights checks the trainer state's checksum instead of the weights'",
    ),
    _training(
        "untied-head-from-embedding",
        CHECKPOINT,
        'if "lm_head.weight" not in state and model.config.tie_word_embeddings:',
        'if "lm_head.weight" not in state:',
        "an untied model missing its head silently gets the embedding as head",
    ),
    _training(
        "resume-may-not-change-steps",
        RUNDIR,
        '    "steps",\n',
        "",
        "a resume may no longer extend (or shorten) train.steps",
    ),
    _training(
        "resume-at-last-step-refused",
        RUNDIR,
        'if now["steps"] < step:',
        'if now["steps"] <= step:',
        "resuming a run whose checkpoint is at train.steps is refused",
    ),
    _training(
        "trim-drops-checkpoint-step",
        RUNDIR,
        'if record["step"] <= step:',
        'if record["step"] < step:',
        "a resume drops the metrics records of the checkpoint's own step",
    ),
    _training(
        "void-run-drops-tokenizer",
        RUNDIR,
        'if not same_task and (out / "tokenizer").is_dir():',
        'if (out / "tokenizer").is_dir():',
        "a restarted void run always deletes the trained tokenizer, even for the same task",
    ),
    _training(
        "cuda-ignores-local-rank",
        DEVICE,
        'device = torch.device("cuda", local_rank)',
        'device = torch.device("cuda", 0)',
        "under torchrun every process takes cuda:0",
    ),
    _training(
        "one-gpu-refused-single-process",
        DEVICE,
        "elif world_size > 1:",
        "elif world_size > 0:",
        "cuda:N is refused even for a single process",
    ),
    # ---------------------------------------------------------------- evaluation
    _evaluation(
        "mqar-weights-by-examples",
        "weights = [s.input_ids.shape[0] * s.num_kv_pairs for s in slices]",
        "weights = [s.input_ids.shape[0] for s in slices]",
        "overall MQAR accuracy weights slices by examples, not by labelled tokens",
    ),
    _evaluation(
        "niah-token-accuracy-off-by-one",
        "predicted = forced[0, prompt_len - 1 : prompt_len - 1 + len(answer)].argmax(-1)",
        "predicted = forced[0, prompt_len : prompt_len + len(answer)].argmax(-1)",
        "NIAH token accuracy reads the predictions one position late",
    ),
    _evaluation(
        "niah-eval-seed-is-train-seed",
        "seed=fold_seed(seed, 1, length),",
        "seed=seed,",
        "NIAH evaluation examples come from the training seed stream",
    ),
    _evaluation(
        "niah-eval-one-needle",
        "num_needles=num_needles,",
        "num_needles=1,",
        "NIAH evaluation ignores the needles of a multi-key run",
    ),
    _evaluation(
        "niah-generates-extra-token",
        "max_new_tokens=len(example.answer_ids),",
        "max_new_tokens=len(example.answer_ids) + 1,",
        "NIAH generation runs one token past the answer",
    ),
    _evaluation(
        "lm-unshifted-target",
        'ids[:, 1:], reduction="none")',
        'ids[:, :-1], reduction="none")',
        "LM evaluation scores position t against token t (no shift)",
    ),
    _evaluation(
        "bits-per-token",
        '"bits_per_byte": total_nll / math.log(2) / max(total_bytes, 1),',
        '"bits_per_byte": total_nll / math.log(2) / max(total_tokens, 1),',
        "bits per byte divides by tokens instead of bytes",
    ),
    _evaluation(
        "position-bucket-not-averaged",
        "bucket = float(position_nll[lo:hi].sum()) / ((hi - lo) * seen)",
        "bucket = float(position_nll[lo:hi].sum()) / (hi - lo)",
        "the per-position loss is summed over blocks instead of averaged",
    ),
    _evaluation(
        "max-blocks-overshoots",
        'ids = batch["input_ids"][: max_blocks - seen if max_blocks else None].to(device)',
        'ids = batch["input_ids"][: max_blocks if max_blocks else None].to(device)',
        "max_blocks is applied per batch: the last batch scores too many blocks",
    ),
    # ---------------------------------------------------------------- tasks
    _tasks(
        "mqar-label-on-key",
        MQAR,
        "labels.scatter_(1, queries + 1, values)",
        "labels.scatter_(1, queries, values)",
        "MQAR labels sit on the queried key instead of the value after it",
    ),
    _tasks(
        "mqar-accuracy-unshifted",
        MQAR,
        "predictions, targets = outputs[:, :-1], labels[:, 1:]",
        "predictions, targets = outputs[:, 1:], labels[:, 1:]",
        "MQAR accuracy compares the prediction at t + 1 with label t + 1",
    ),
    _tasks(
        "mqar-power-law-inverted",
        MQAR,
        "log_weights = (config.power_a - 1) * torch.arange(",
        "log_weights = (1 - config.power_a) * torch.arange(",
        "MQAR query gaps favour late positions instead of early ones",
    ),
    _tasks(
        "niah-label-one-early",
        NIAH,
        "start = 0 if train_on_prompt else len(prompt)",
        "start = 0 if train_on_prompt else len(prompt) - 1",
        "NIAH training also labels the prompt's last token",
    ),
    _tasks(
        "niah-needle-farthest-boundary",
        NIAH,
        "cut = min(free, key=lambda j: abs(j - depth * count))",
        "cut = max(free, key=lambda j: abs(j - depth * count))",
        "the needle goes at the sentence boundary farthest from its depth",
    ),
    _tasks(
        "niah-needles-share-boundary",
        NIAH,
        "free = [j for j in boundaries if j not in at] or boundaries",
        "free = boundaries",
        "multi-key needles may share a sentence boundary instead of each having its own",
    ),
    _tasks(
        "niah-example-not-longest",
        NIAH,
        "while high - low > 1:",
        "while high - low > 2:",
        "the bisection stops early: an example is not the longest that fits",
    ),
    _tasks(
        "niah-depth-grid-short-of-one",
        NIAH,
        "return [i / (n - 1) for i in range(n)]",
        "return [i / n for i in range(n)]",
        "the needle depth grid never reaches depth 1",
    ),
    _tasks(
        "exact-match-prefix",
        NIAH,
        'pattern = rf"(?<![0-9a-z]){re.escape(answer)}(?![0-9a-z])"',
        'pattern = rf"(?<![0-9a-z]){re.escape(answer)}"',
        "exact match accepts an answer followed by more digits",
    ),
    _tasks(
        "split-boundary-inclusive",
        CORPUS,
        "for split, bound in _SPLIT_BOUNDS.items() if bucket < bound)",
        "for split, bound in _SPLIT_BOUNDS.items() if bucket <= bound)",
        "files of bucket 90 and 95 move to the previous split",
    ),
    _tasks(
        "num-bytes-counts-first-token",
        CORPUS,
        "num_bytes = self.token_bytes[blocks[:, 1:]].sum(axis=1)  # [B]",
        "num_bytes = self.token_bytes[blocks].sum(axis=1)  # [B]",
        "a block's bytes include its first token, which is not a target",
    ),
    _tasks(
        "no-eos-between-documents",
        CORPUS,
        "pieces += [np.asarray(ids, dtype=dtype), eos]",
        "pieces += [np.asarray(ids, dtype=dtype)]",
        "documents are joined without the eos separator",
    ),
    _tasks(
        "token-cache-hash-without-lengths",
        CORPUS,
        'content.update(len(data).to_bytes(8, "little") + data)',
        "content.update(data)",
        "the token cache key ignores document boundaries (['ab', 'c'] == ['a', 'bc'])",
    ),
    _tasks(
        "eval-drops-last-block",
        CORPUS,
        "mine = np.arange(rank, self.num_blocks, world_size)",
        "mine = np.arange(rank, self.num_blocks - 1, world_size)",
        "evaluation never scores the last block",
    ),
    _tasks(
        "stream-dtype-boundary",
        CORPUS,
        "dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32",
        "dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.int32",
        "a vocabulary of exactly 65536 ids is stored as int32",
        equivalent=(
            "ids of a 65536-token vocabulary fit both uint16 and int32; blocks are read as "
            "int64 and the cache file name does not depend on the dtype"
        ),
    ),
    _tasks(
        "byte-specials-count-bytes",
        TOKENIZERS,
        "return [1] * 256 + [0] * (self.vocab_size - 256)",
        "return [1] * self.vocab_size",
        "the byte tokenizer's special tokens count one byte each (bits per byte)",
    ),
    _tasks(
        "bpe-bytes-of-symbols",
        TOKENIZERS,
        "lengths[token_id] = 0 if token in special else len(token)",
        'lengths[token_id] = 0 if token in special else len(token.encode("utf-8"))',
        "BPE byte lengths count the UTF-8 bytes of the byte-level symbols (Ġ is 2)",
    ),
    _tasks(
        "bpe-fingerprint-ignores-merges",
        TOKENIZERS,
        'return f"bpe-{self.vocab_size}-{_digest(self._tokenizer.to_str() + roles)}"',
        'return f"bpe-{self.vocab_size}-{_digest(roles)}"',
        "two BPEs of one vocabulary size share a fingerprint (stale token caches)",
    ),
    _tasks(
        "special-strings-become-specials",
        TOKENIZERS,
        "self._tokenizer.encode_special_tokens = True",
        "self._tokenizer.encode_special_tokens = False",
        "'<eos>' inside a text encodes as the eos token",
    ),
    _tasks(
        "sampler-ranks-overlap",
        SAMPLING,
        "first = (step * world_size + rank) * batch_size",
        "first = (step + rank) * batch_size",
        "ranks' batches overlap and steps under data parallelism repeat items",
    ),
    _tasks(
        "sampler-same-order-each-epoch",
        SAMPLING,
        "generator = torch.Generator().manual_seed(fold_seed(seed, epoch))",
        "generator = torch.Generator().manual_seed(fold_seed(seed))",
        "every epoch visits the items in the same order",
    ),
    # ---------------------------------------------------------------- integrations
    _integrations(
        "empty-context-on-bos",
        "return self.eot_token_id",
        "return self.tokenizer.bos_token_id",
        "an empty context conditions on bos (never trained) instead of eos",
    ),
    _integrations(
        "generation-runs-past-eos",
        'generation_kwargs.setdefault("eos_token_id", self.eot_token_id)',
        'generation_kwargs.setdefault("eos_token_id", None)',
        "generation does not stop rows at eos",
    ),
    _integrations(
        "saved-tokenizer-ignored",
        'tokenizer = (find_tokenizer(model_folder) if model_folder else None) or "byte"',
        'tokenizer = "byte"',
        "a model folder's own tokenizer is ignored for the byte tokenizer",
    ),
    _integrations(
        "vocab-size-unchecked",
        "if len(tokenizer) != self.config.vocab_size:",
        "if False:",
        "a tokenizer of another vocabulary than the model's is accepted",
    ),
    _integrations(
        "growmem-tokenizer-unconverted",
        "if not isinstance(tokenizer, PreTrainedTokenizerBase):",
        "if False:",
        "a growmem tokenizer reaches HFLM without its Hugging Face form",
    ),
    _integrations(
        "mixed-precision-ignored",
        "enabled=self.mixed_precision_dtype is not None,",
        "enabled=False,",
        "mixed_precision_dtype is accepted but never applied",
    ),
    # ---------------------------------------------------------------- Hugging Face files, generate
    _tasks(
        "hf-special-token-names-special",
        "growmem/tasks/tokenizers.py",
        "split_special_tokens=True,",
        "split_special_tokens=False,",
        "the saved Hugging Face tokenizer encodes '<eos>' inside a text as eos, growmem as text",
        tests=("tests/tasks", "tests/integrations"),
    ),
    _tasks(
        "hf-decode-cleans-spaces",
        "growmem/tasks/tokenizers.py",
        "clean_up_tokenization_spaces=False,",
        "clean_up_tokenization_spaces=True,",
        "the Hugging Face tokenizer's decode drops the space before punctuation",
        tests=("tests/tasks",),
        equivalent="transformers 5 ignores clean_up_tokenization_spaces for BPE tokenizers (it "
        "warns); the False saved in tokenizer_config.json matters to transformers 4, whose "
        "default was True",
    ),
    _tasks(
        "hf-json-rewritten",
        "growmem/tasks/tokenizers.py",
        "    tokenizer.save(str(directory / HF_FILE))\n",
        "",
        "tokenizer.json is transformers' rewrite (a post-processor added): a saved BPE's "
        "fingerprint differs from the trained one's, so a resumed run refuses its tokenizer",
        tests=("tests/tasks",),
    ),
    _models(
        "cache-online-counts-cached",
        CACHE,
        'parts["online"] += cache.nbytes() - cached',
        'parts["online"] += cache.nbytes()',
        "the online state's bytes include the cached segments' (the parts exceed nbytes)",
    ),
    _training(
        "generate-prompt-without-eos",
        "growmem/generate.py",
        "ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]",
        "ids = tokenizer.encode(prompt)",
        "generate reads the prompt without the eos that starts every training document",
    ),
    _training(
        "stream-writes-cut-characters",
        "growmem/generate.py",
        "self._write(self.tokenizer.decode(self.ids).rstrip(REPLACEMENT))",
        "self._write(self.tokenizer.decode(self.ids))",
        "the stream writes U+FFFD for a multi-byte character whose bytes are still coming",
    ),
)
