"""Command lines: the recipes' runner (`run_recipe`) and `python -m longqlora SUBCOMMAND`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def _fail(err: Exception):
    """Bad input ends in one line naming the flag and the fix; LONGQLORA_TRACEBACK=1 shows the traceback."""
    if os.environ.get("LONGQLORA_TRACEBACK"):
        raise err
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def run_recipe(model_cls, data_cls, training_cls, argv=None) -> Path | None:
    """Parse `--flag value` and `--config x.yaml` over a recipe's dataclasses (whose defaults are the recipe),
    then dry-run or train. Returns the adapter directory (None for --dry_run)."""
    from trl import TrlParser

    from longqlora.train import RunConfig, describe, resolve, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = TrlParser((model_cls, data_cls, RunConfig, training_cls))
    try:
        model_cfg, data_cfg, run_cfg, training = parser.parse_args_and_config(args=argv)
        model_cfg, data_cfg, training, info = resolve(model_cfg, data_cfg, run_cfg, training)
        if run_cfg.dry_run:
            from longqlora.model import count_trainable_without_weights

            info.update(count_trainable_without_weights(model_cfg, trust_remote_code=training.trust_remote_code))
            print(describe(info, training, data_cfg))
            return None
        return train(model_cfg, data_cfg, training)
    except ValueError as err:
        _fail(err)


def main(argv=None):
    """`longqlora SUBCOMMAND ...`: subcommands arrive with the evaluation and merge tools."""
    argv = sys.argv[1:] if argv is None else argv
    print("usage: python -m longqlora {merge,perplexity,passkey,chat,plan} ... (not yet available)", file=sys.stderr)
    return 2


def run_quickstart(config_cls, argv=None) -> dict | None:
    """Parse the quickstart's flags (`--config x.yaml` too), run it and print its report."""
    from trl import TrlParser

    from longqlora.quickstart import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        (cfg,) = TrlParser((config_cls,)).parse_args_and_config(args=argv)
        if cfg.dry_run:
            print(f"quickstart: pre-train a {cfg.hidden_size}-wide {cfg.num_layers}-layer Llama at "
                  f"{cfg.short_context} tokens for {cfg.pretrain_steps} steps, extend to {cfg.long_context} "
                  f"(S2-Attn group {round(cfg.group_ratio * cfg.long_context)}, and full attention) for "
                  f"{cfg.extend_steps} steps each, score {cfg.eval_tokens} held-out tokens; output {cfg.output_dir}")
            return None
        result = run(cfg)
    except ValueError as err:
        _fail(err)
    print(result["report"])
    return result
