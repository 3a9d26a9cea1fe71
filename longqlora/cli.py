"""Command lines: the recipes' runner (`run_recipe`) and `python -m longqlora SUBCOMMAND`."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path

from longqlora import hardware
from longqlora.config_file import parse_flags, parse_with_config
from longqlora.errors import BROKEN_PIPE_EXIT, INTERRUPTED_EXIT, Interrupted, input_error_types, one_line


def fail(err: BaseException):
    """Print `error: <one line>` and exit 2; LONGQLORA_TRACEBACK=1 re-raises to show the traceback."""
    if os.environ.get("LONGQLORA_TRACEBACK"):
        raise err
    print(f"error: {one_line(err)}", file=sys.stderr)
    raise SystemExit(2) from None


@contextmanager
def one_line_errors():
    """Run an entry point: input errors end in one line (exit 2), an interruption in one line (exit 130)."""
    try:
        yield
        sys.stdout.flush()  # here, where a reader that went away is caught, not at interpreter exit
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT) from None
    except BrokenPipeError as err:
        if not _stdout_reader_gone():  # another pipe (a worker's): not the reader of our output
            fail(err)
        # the output's reader stopped (`| head`): nothing wrong with the input, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        raise SystemExit(BROKEN_PIPE_EXIT) from None
    except KeyboardInterrupt:
        if os.environ.get("LONGQLORA_TRACEBACK"):
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT) from None
    except input_error_types() as err:
        fail(err)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no real stdout
        return False


def setup_logging() -> None:
    """One log format for every entry point (recipes, subcommands, data scripts, bench and experiments)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_recipe(model_cls, data_cls, training_cls, argv=None) -> Path | None:
    """Parse `--flag value` and `--config x.yaml` over a recipe's dataclasses (whose defaults are the recipe),
    then dry-run or train. Returns the adapter directory (None for --dry_run)."""
    from trl import TrlParser

    from longqlora.training.config import RunConfig
    from longqlora.training.distributed import end_processes
    from longqlora.training.run import resolve, train
    from longqlora.training.summary import describe

    setup_logging()
    with one_line_errors():
        hardware.launch()  # first: accelerate parses the launch's DeepSpeed JSON inside SFTConfig without naming it
        parser = TrlParser(tuple(map(with_parent_help, (model_cls, data_cls, RunConfig, training_cls))))
        group_the_help(parser, (model_cls, data_cls, RunConfig), training_cls)
        model_cfg, data_cfg, run_cfg, training = parse_with_config(parser, argv)
        run = resolve(model_cfg, data_cfg, run_cfg, training)
        counts = dry_run_counts(run)  # adapters on a meta-device model: a --lora_target it lacks fails before loading
        if run_cfg.dry_run:
            print(describe(run, **counts))
            return None
        adapter = train(run)
    end_processes()
    return adapter


def with_parent_help(cls):
    """`cls` with each field that a recipe re-declares as `x: T = v` given its parent's help text, so that `--help`
    describes the recipe's flags and shows the recipe's own values as their defaults (dataclasses drop the metadata
    of a re-declared field, and argparse then shows neither). Only the help: a parent's other parser settings
    (nargs, const) belong to its own type and default."""

    def parent_help(name: str) -> str | None:
        for base in cls.__mro__[1:]:
            for f in dataclasses.fields(base) if dataclasses.is_dataclass(base) else ():
                if f.name == name and f.metadata.get("help"):
                    return f.metadata["help"]
        return None

    for f in dataclasses.fields(cls):
        if not f.metadata and (text := parent_help(f.name)):
            f.metadata = types.MappingProxyType({"help": text})
    return cls


def group_the_help(parser, own_classes, training_cls) -> None:
    """A recipe's --help lists its own flags first (model, data, run, and the training flags this toolkit or the
    recipe declares), then SFTConfig's and TrainingArguments' own (some 500, which buried them), with a short usage
    line; each flag a run sets itself says so, and why. argparse has no public API for regrouping: its lists are
    edited here."""
    from longqlora.training.config import REFUSED_HELP, TrainingConfig

    own = {f.name for cls in own_classes for f in dataclasses.fields(cls)}
    for cls in training_cls.__mro__:  # the recipe's class and TrainingConfig: what this toolkit declares
        own |= set(vars(cls).get("__annotations__", {}))
        if cls is TrainingConfig:
            break
    ours = parser.add_argument_group("the recipe's flags (model, data, run, training)")
    theirs = parser.add_argument_group("TRL's SFTConfig and transformers' TrainingArguments")
    for group in parser._action_groups[:-2]:
        for action in [a for a in group._group_actions if a.option_strings and a.dest != "help"]:
            group._group_actions.remove(action)
            refused = REFUSED_HELP.get(action.dest)
            (ours if action.dest in own and not refused else theirs)._group_actions.append(action)
            if refused:
                action.help = f"Not taken by a recipe: {refused}."
    parser.usage = "%(prog)s [--flag value ...] [--config FILE.yaml] [--help]"


def dry_run_counts(run) -> dict:
    """The parameter counts --dry_run prints, from a meta-device model. Under a ZeRO-3 launch, transformers would
    build it inside deepspeed.zero.Init (which starts torch.distributed): its switch is off while counting."""
    import transformers.integrations.deepspeed as hf_deepspeed

    from longqlora.model import count_trainable_without_weights

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # the switch is this module global (a weakref), no getter
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        return count_trainable_without_weights(
            run.model, run.hf_config, trust_remote_code=run.training.trust_remote_code
        )
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _perplexity(argv):
    from transformers import HfArgumentParser

    from longqlora.evaluation.perplexity import PerplexityConfig, run_perplexity

    (cfg,) = parse_flags(HfArgumentParser(PerplexityConfig, prog="python -m longqlora perplexity"), argv)
    result = run_perplexity(cfg)
    from longqlora.output import markdown_table

    original = result["original_context"]
    beyond = f"perplexity_positions_ge_{original}"  # where an extension shows: positions the base never trained on
    print(
        f"{result['model']}{' + ' + result['adapter'] if result['adapter'] else ''} on {result['data']} "
        f"({result['text_tokens']} tokens; context {result['model_context']}, {result['scaling']})"
    )
    print(
        markdown_table(
            ["context", "windows", "tokens scored", "perplexity", f"positions >= {original}"],
            [
                [r["context_length"], r["windows"], r["tokens_scored"], round(r["perplexity"], 3)]
                + ["" if r[beyond] is None else round(r[beyond], 3)]
                for r in result["results"]
            ],
        )
    )
    print(f"protocol at {result['results'][-1]['context_length']}: {result['results'][-1]['protocol']}")
    if cfg.output:
        out = Path(cfg.output)
        print(f"wrote {out}, {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
    return 0


def _passkey(argv):
    from transformers import HfArgumentParser

    from longqlora.evaluation.passkey import PasskeyConfig, run_passkey
    from longqlora.output import markdown_table

    (cfg,) = parse_flags(HfArgumentParser(PasskeyConfig, prog="python -m longqlora passkey"), argv)
    result = run_passkey(cfg)
    print(
        f"passkey retrieval: {result['model']}{' + ' + result['adapter'] if result['adapter'] else ''} "
        f"(context {result['model_context']}, {result['scaling']}), {cfg.trials} trials per cell, "
        f"seed {cfg.seed}: {result['accuracy']:.1%} overall"
    )
    print(
        markdown_table(
            ["context", "prompt tokens", *[f"depth {d:g}" for d in cfg.depths], "accuracy"],
            [
                [
                    r["context_length"],
                    r["prompt_tokens_max"],
                    *[c["accuracy"] for c in result["cells"] if c["context_length"] == r["context_length"]],
                    r["accuracy"],
                ]
                for r in result["by_length"]
            ],
        )
    )
    if cfg.output_dir:
        print(f"wrote {result['files']['json']} and {result['files']['png']}")
    return 0


def _chat(argv):
    from transformers import HfArgumentParser

    from longqlora.chat import ChatConfig, chat_loop, load_chat_model, one_shot, with_trained_system_prompt

    (cfg,) = parse_flags(HfArgumentParser(ChatConfig, prog="python -m longqlora chat"), argv)
    cfg = with_trained_system_prompt(cfg)
    model, tokenizer = load_chat_model(cfg)
    if cfg.prompt is not None:
        one_shot(cfg, model, tokenizer, sys.stdout)
        return 0
    return chat_loop(cfg, model, tokenizer, sys.stdin, sys.stdout)


def _merge(argv):
    from transformers import HfArgumentParser

    from longqlora.merge import MergeConfig, describe, merge

    (cfg,) = parse_flags(HfArgumentParser(MergeConfig, prog="python -m longqlora merge"), argv)
    print(describe(merge(cfg)))
    return 0


def _plan(argv):
    import json

    from transformers import HfArgumentParser

    from longqlora.presets import preset_or_local_config
    from longqlora.training.advice import advise, render
    from longqlora.training.plan import PlanConfig

    (cfg,) = parse_flags(HfArgumentParser(PlanConfig, prog="python -m longqlora plan"), argv)
    # Checked here, not in PlanConfig: the planner switches offloading off and on in its search, keeping the split.
    if cfg.offload_layers is not None and not cfg.offload:
        raise ValueError(f"--offload_layers {cfg.offload_layers}: splits the offloaded checkpoints; add --offload")
    result = advise(preset_or_local_config(cfg.model), cfg)
    print(json.dumps(result, indent=2) if cfg.json else render(result))
    return 0


COMMANDS = {
    "merge": (_merge, "fold an adapter into its base: a plain model with the extended context"),
    "perplexity": (_perplexity, "sliding-window perplexity at several context lengths"),
    "passkey": (_passkey, "passkey retrieval accuracy by context length and key depth"),
    "plan": (_plan, "predicted peak GPU memory of training, the longest context that fits, switches to turn on"),
    "chat": (_chat, "chat with a model in its own chat template, a --context_file document, streamed replies"),
}


def main(argv=None) -> int:
    """`python -m longqlora SUBCOMMAND [--flags]`; `--help` after a subcommand lists its flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # the console script `longqlora` or `python -m longqlora`
    prog = "python -m longqlora" if sys.argv[0].endswith("__main__.py") else Path(sys.argv[0]).name
    with one_line_errors():  # the usage too: a reader that stops early (`| head`) is caught there
        if not argv or argv[0] not in COMMANDS:
            asked = bool(argv) and argv[0] in ("-h", "--help")
            lines = [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
            print(
                f"usage: {prog} SUBCOMMAND [--help | flags]\n\nsubcommands:\n" + "\n".join(lines),
                file=sys.stdout if asked else sys.stderr,
            )
            if asked:
                return 0
            what = f"unknown subcommand {argv[0]!r}" if argv else "no subcommand given"
            print(f"error: {what}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        setup_logging()
        return COMMANDS[argv[0]][0](argv[1:])


def run_data_script(dataclass_types, run, summary, doc: str, argv=None) -> dict:
    """The data_prep scripts' command line: parse, `run(*configs) -> stats`, print the stats and `summary`."""
    from transformers import HfArgumentParser

    from longqlora.output import markdown_table

    setup_logging()
    parser = HfArgumentParser(dataclass_types, description=doc.split("\n")[0])
    with one_line_errors():  # the prints too: a reader that stops early (`| head`) is caught there
        configs = parse_flags(parser, sys.argv[1:] if argv is None else list(argv))
        stats = run(*configs)
        print(markdown_table(["stat", "value"], [[k, str(v)] for k, v in stats.items()]))
        print(summary(stats, *configs))
    return stats
