"""Convert instruction data (LongAlpaca, LongQLoRA, ShareGPT, role/content messages, TRL prompt/completion) to chats.

    python data_prep/prepare_instructions.py --dataset data/LongAlpaca-12k.json \
        --tokenizer meta-llama/Llama-2-7b-hf --output_dir data/longalpaca_msgs --max_length 8192 \
        --overlong truncate --num_proc 8

Writes to --output_dir a `save_to_disk` dataset with one `messages` column and `stats.json`, atomically. Lengths
are measured through the chat template training renders with (--chat_template_path's, else the tokenizer's own, or
Vicuna v1.1 where it has none; stats.json names it); with assistant_only_loss=True TRL trains only the replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longqlora.cli import run_data_script
from longqlora.data.formats import read_template_file, training_chat_template
from longqlora.data.instructions import InstructionDataConfig, length_report, load_conversations
from longqlora.data.prepared import check_prepare_flags, source_record
from longqlora.model_files import load_tokenizer
from longqlora.output import check_output_dir, save_dataset_atomic


@dataclass
class ScriptArguments:
    tokenizer: str = field(metadata={"help": "Tokenizer directory or hub id (the base model's)."})
    output_dir: str = field(metadata={"help": "Where to write the conversations and stats.json."})
    max_length: int = field(metadata={"help": "Training sequence length (the target context) in tokens."})
    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "A .jinja chat template to measure with, as training's --chat_template_path applies it."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})


def run(cfg: InstructionDataConfig, args: ScriptArguments) -> dict:
    check_output_dir(args.output_dir, args.overwrite)
    check_prepare_flags(cfg)
    if args.chat_template_path:
        read_template_file(args.chat_template_path)  # before the data is read
    stats = {**source_record(cfg), "tokenizer": args.tokenizer, "system_prompt": cfg.system_prompt}
    conversations = load_conversations(cfg, stats=stats)  # every record checked before the tokenizer loads
    tokenizer = load_tokenizer(args.tokenizer)
    stats["chat_template"] = training_chat_template(tokenizer, "--tokenizer", args.chat_template_path)  # training's
    conversations, lengths = length_report(conversations, tokenizer, args.max_length, cfg.overlong, cfg.num_proc)
    stats.update(lengths)
    save_dataset_atomic(conversations, args.output_dir, files={"stats.json": stats}, overwrite=args.overwrite)
    return stats


def main(argv: list[str] | None = None) -> None:
    run_data_script(
        (InstructionDataConfig, ScriptArguments),
        run,
        lambda stats, cfg, args: (
            f"wrote {stats['count_out']} conversations to {args.output_dir}; skipped {stats['skipped_invalid']} "
            f"invalid ({stats['skipped_empty_reply']} for an empty assistant reply); {stats['over_max_length']} exceed "
            f"--max_length {args.max_length} (--overlong {cfg.overlong}"
            + (
                f"; {stats['answers_lost']} keep no reply token within it and training drops them: "
                f"{stats['count_out'] - stats['answers_lost']} will train)"
                if stats.get("answers_lost")
                else ")"
            )
        ),
        __doc__,
        argv,
    )


if __name__ == "__main__":
    main()
