"""Tokenize plain-text documents for long-context language-model training; TRL's SFTTrainer packs them later.

    python data_prep/prepare_text.py --dataset data/pg19/train.jsonl --text_field text \
        --tokenizer meta-llama/Llama-2-7b-hf --output_dir data/pg19_llama2 --max_length 8192 \
        --min_length 1024 --pack documents --num_proc 8

Writes to --output_dir a `save_to_disk` dataset with one `input_ids` column (each document followed by EOS, not
truncated) and `stats.json` (documents, tokens, lengths, the TRL packing strategy to train with, and the tokenizer:
name, size and a vocabulary digest), atomically. A recipe trains on it as it is (`--dataset <output_dir>`), and
refuses it for a model whose tokenizer differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longqlora.cli import run_data_script
from longqlora.data.prepared import check_prepare_flags, source_record, tokenizer_record
from longqlora.data.text import TextDataConfig, check_packable, load_documents, tokenize_documents
from longqlora.model_files import load_tokenizer
from longqlora.output import check_output_dir, save_dataset_atomic


@dataclass
class ScriptArguments:
    tokenizer: str = field(metadata={"help": "Tokenizer directory or hub id (the base model's)."})
    output_dir: str = field(metadata={"help": "Where to write the tokenized dataset and stats.json."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Training row length (the target context); checks the text fills at least one row."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"--max_length {self.max_length}: must be a positive number of tokens, e.g. 8192")


def run(cfg: TextDataConfig, args: ScriptArguments) -> dict:
    check_output_dir(args.output_dir, args.overwrite)
    check_prepare_flags(cfg)
    documents = load_documents(cfg)  # every file read and checked before the tokenizer loads
    tokenizer = load_tokenizer(args.tokenizer)
    tokenized, stats = tokenize_documents(documents, tokenizer, cfg)
    if args.max_length is not None:
        check_packable(stats, args.max_length, cfg.dataset)
        stats["rows_of_max_length"] = round(stats["tokens_total"] / args.max_length, 2)
    # the data it came from and the tokenizer's identity, which training compares with the model's
    stats = {**source_record(cfg), "tokenizer": args.tokenizer, **tokenizer_record(tokenizer), **stats}
    save_dataset_atomic(tokenized, args.output_dir, files={"stats.json": stats}, overwrite=args.overwrite)
    return stats


def main(argv: list[str] | None = None) -> None:
    run_data_script(
        (TextDataConfig, ScriptArguments),
        run,
        lambda stats, cfg, args: (
            f"wrote {stats['documents_out']} documents ({stats['tokens_total']} tokens) to {args.output_dir}; train "
            f"with a recipe's --dataset {args.output_dir} --pack {cfg.pack} (SFTConfig(packing=True, "
            f"packing_strategy={stats['packing_strategy']!r}))"
        ),
        __doc__,
        argv,
    )


if __name__ == "__main__":
    main()
