"""Does a small Llama learn to copy from its context, and is what it learns a copy or a positional shortcut?

Trains the ablations' base shape (width 256, 4 heads, --layers layers, L = 128) from scratch on rows of random
token ids in which a run recurs, and reports the loss on the recurring tokens (copyable) against the rest, on two
kinds of rows:
- fixed: the run is the whole first half and recurs as the second half (offset always L/2);
- varied: filler, a run of 8-40 tokens, filler, the run again (offsets vary row by row), so only attending to the
  token after an earlier occurrence of the current one (an induction head) predicts it;
- periodic: filler, then a run of --runs tokens repeated to the row's end (the period varies row by row): the same
  mechanism as varied, with most of the row copyable instead of a sixth of it.
A model trained on fixed rows is also scored on varied rows: if its copying is positional it does not transfer.
A plain torch loop on purpose: this probes the model's mechanism, not the toolkit's training path.

    python bench/copy_probe.py --steps 400 --output out/copy_probe.json     # ~7 min on 2 CPU cores
    python bench/copy_probe.py --kinds varied --layers 2 --run_vocab 256 --steps 1500 --output out/copy_probe_v256.json
    python bench/copy_probe.py --kinds varied --layers 2 --runs 40,64 --steps 1500 --output out/copy_probe_dense.json
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longqlora.output import write_json_atomic  # noqa: E402
from longqlora.training.tiny import tiny_llama_config  # noqa: E402

L, VOCAB = 128, 2048
KINDS = ("fixed", "varied", "periodic")


def batch(
    kind: str, rng: random.Random, vocab: int = VOCAB - 3, runs=(8, 40), rows: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, L) ids drawn from the first `vocab` ordinary ids and a (rows, L - 1) mask of the targets that an
    earlier occurrence predicts."""
    ids, masks = [], []
    for _ in range(rows):
        if kind == "periodic":  # filler, then one run repeated to the row's end: every token after one period copies
            period, before = rng.randint(*runs), rng.randint(0, runs[1])
            tokens = [rng.randrange(3, 3 + vocab) for _ in range(period)]
            row = [rng.randrange(3, 3 + vocab) for _ in range(before)] + tokens * (L // period + 1)
            ids.append(row[:L])
            masks.append([j + 1 > before + period for j in range(L - 1)])
            continue
        if kind == "fixed":
            run, before, gap = L // 2, 0, 0
        else:
            run = rng.randint(*runs)
            before = rng.randint(0, L - 2 * run)
            gap = rng.randint(0, L - 2 * run - before)
        tokens = [rng.randrange(3, 3 + vocab) for _ in range(run)]
        row = [rng.randrange(3, 3 + vocab) for _ in range(before)] + tokens
        row += [rng.randrange(3, 3 + vocab) for _ in range(gap)] + tokens
        row += [rng.randrange(3, 3 + vocab) for _ in range(L - len(row))]
        second = before + run + gap  # position of the run's second start; its first token is not predictable
        ids.append(row)
        masks.append([second < j + 1 < second + run for j in range(L - 1)])
    return torch.tensor(ids), torch.tensor(masks)


def losses(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    logits = model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return nll.mean(), {"copyable": nll[mask].mean().item(), "other": nll[~mask].mean().item()}


def train(
    kind: str, steps: int, layers: int, seed: int, vocab: int, runs, rows: int = 32, lr: float = 1e-3, hidden: int = 256
) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    shape = dict(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=3 * hidden, num_attention_heads=hidden // 64
    )
    config = tiny_llama_config(
        "gqa", vocab_size=VOCAB, max_position_embeddings=L, num_key_value_heads=hidden // 64, **shape
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    curve, started = [], time.perf_counter()
    for step in range(1, steps + 1):
        loss, parts = losses(model, *batch(kind, rng, vocab, runs, rows))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), warmup.step(), opt.zero_grad()
        if step % 50 == 0 or step == steps:
            curve.append({"step": step, **{k: round(v, 3) for k, v in parts.items()}})
            print(kind, curve[-1], flush=True)
    with torch.no_grad():
        held = {k: round(losses(model, *batch(k, random.Random(99), vocab, runs))[1]["copyable"], 3) for k in KINDS}
    return {"curve": curve, "held_out_copyable": held, "seconds": round(time.perf_counter() - started)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="fixed,varied", help="Which rows to train on, comma-separated.")
    parser.add_argument("--run_vocab", type=int, default=VOCAB - 3, help="Draw tokens from this many ids only.")
    parser.add_argument("--runs", default="8,40", help="Shortest,longest run of varied rows (at most L/2).")
    parser.add_argument("--rows", type=int, default=32, help="Rows of L tokens per step.")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=256, help="Width (heads of 64).")
    parser.add_argument("--output", default="out/copy_probe.json")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    runs = tuple(int(n) for n in args.runs.split(","))
    if len(runs) != 2 or not 1 <= runs[0] <= runs[1] <= L // 2:
        parser.error(f"--runs {args.runs}: two lengths, shortest first, at most {L // 2}")
    if not kinds or set(kinds) - set(KINDS) or not 2 <= args.run_vocab <= VOCAB - 3:
        parser.error(f"--kinds takes {','.join(KINDS)}; --run_vocab 2..{VOCAB - 3}")
    result = {
        k: train(k, args.steps, args.layers, args.seed, args.run_vocab, runs, args.rows, args.lr, args.hidden)
        for k in kinds
    }
    result["uniform_loss"] = round(float(torch.tensor(float(args.run_vocab)).log()), 3)
    write_json_atomic(Path(args.output), {"args": vars(args), **result})
    print(json.dumps({k: v["held_out_copyable"] if isinstance(v, dict) else v for k, v in result.items()}))
