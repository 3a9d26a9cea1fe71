"""The ablation variants of experiments.ablations: what each changes against the reference extension, by id.
The ids name cached results and report rows, so an id keeps its meaning; new settings are added, not changed."""

# id -> what differs from the reference extension (LoRA+ = LoRA r on q/k/v/o + trained embeddings and norms, fp32
# base, leak-free S2, a fixed group of 1/4). "train": False = no fine-tuning; "pi": position interpolation to 4L;
# group_schedule: ratios of 4L sharing the steps (model.DEFAULT_SCHEDULE x 1/4 is the toolkit default's).
VARIANTS = {
    "base": dict(label="no fine-tuning, no interpolation", train=False, pi=False),
    "pi": dict(label="interpolation only, no fine-tuning", train=False),
    "lora-full": dict(label="LoRA q/k/v/o, full attention", trainable="", s2=False),
    "loraplus-full": dict(label="LoRA+ (embed, norms), full attention", s2=False),
    "loraplus-s2": dict(label="LoRA+, S2-Attn"),
    "loraplus-s2-nf4": dict(label="LoRA+, S2-Attn, NF4 base", nf4=True),
    "default": dict(
        label="LoRA+, S2-Attn with group schedule, NF4 (toolkit default until YaRN)",
        nf4=True,
        group_schedule="0.0625,0.1875,0.5",
    ),
    "fullft-full": dict(label="full fine-tuning, full attention", full_ft=True, s2=False),
    "loraplus-s2-rolled": dict(label="LoRA+, S2-Attn, LongLoRA's rolled shift", shift="rolled"),
    "loraplus-s2-sink4": dict(label="LoRA+, S2-Attn + 4 sink tokens", sinks=4),
    "loraplus-s2-full25": dict(label="LoRA+, S2-Attn, 1/4 of heads full", full_heads=0.25),
    "loraplus-s2-fullstep4": dict(label="LoRA+, S2-Attn, every 4th step full", full_every=4),
    "loraplus-s2-gsched": dict(label="LoRA+, S2-Attn, group 1/8, 1/4, 1/2 by thirds", group_schedule="0.125,0.25,0.5"),
    # two schedules whose mean group is plain S2's 1/4 (the same attention cost), ending at 1/2 or at 3/8
    "loraplus-s2-gsched-eq": dict(
        label="LoRA+, S2-Attn, group 1/16, 3/16, 1/2 by thirds", group_schedule="0.0625,0.1875,0.5"
    ),
    "loraplus-s2-gsched-lin": dict(
        label="LoRA+, S2-Attn, group 1/8, 1/4, 3/8 by thirds", group_schedule="0.125,0.25,0.375"
    ),
    "loraplus-s2-g50": dict(label="LoRA+, S2-Attn, group 1/2", group_ratio=0.5),
    # PoSE (arXiv 2309.10400): rows of pose x 4L = L tokens whose position ids span 4L, batch / pose rows, so the
    # same tokens and optimizer steps as the 4L rows of the others; S2 groups are 1/4 (-g50: 1/2) of the L-token row.
    "loraplus-s2-pose": dict(label="LoRA+, S2-Attn, PoSE: rows of L spanning 4L, 4x batch", pose=0.25),
    "loraplus-s2-pose-g50": dict(
        label="LoRA+, S2-Attn group 1/2, PoSE: rows of L spanning 4L, 4x batch", pose=0.25, group_ratio=0.5
    ),
    "loraplus-pose": dict(label="LoRA+, full attention, PoSE: rows of L spanning 4L, 4x batch", s2=False, pose=0.25),
    # YaRN (arXiv 2309.00071) instead of linear interpolation: the fast RoPE dimensions, which tell neighbouring
    # tokens apart, keep their frequency (rope.py); the rest as their PI counterparts
    "yarn": dict(label="YaRN only, no fine-tuning", train=False, rope="yarn"),
    "loraplus-full-yarn": dict(label="LoRA+, full attention, YaRN", s2=False, rope="yarn"),
    "loraplus-s2-yarn": dict(label="LoRA+, S2-Attn, YaRN", rope="yarn"),
    # what separates default-yarn from loraplus-s2-yarn: the NF4 base, or the group schedule
    "loraplus-s2-nf4-yarn": dict(label="LoRA+, S2-Attn, NF4 base, YaRN", nf4=True, rope="yarn"),
    "loraplus-s2-gsched-eq-yarn": dict(
        label="LoRA+, S2-Attn, group 1/16, 3/16, 1/2 by thirds, YaRN", group_schedule="0.0625,0.1875,0.5", rope="yarn"
    ),
    # does training the embedding and norms cost the copy that longer extensions lose? does full attention every
    # 4th step keep it?
    "lora-s2-yarn": dict(label="LoRA q/k/v/o, S2-Attn, YaRN", trainable="", rope="yarn"),
    "loraplus-s2-fullstep4-yarn": dict(label="LoRA+, S2-Attn, every 4th step full, YaRN", full_every=4, rope="yarn"),
    # PoSE on the base that uses its context, with YaRN (the default): do the long distances its skips create teach
    # retrieval and copying that S2-Attn at full length, at the same tokens, does not?
    "loraplus-pose-yarn": dict(
        label="LoRA+, full attention, PoSE: rows of L spanning 4L, 4x batch, YaRN", s2=False, pose=0.25, rope="yarn"
    ),
    "loraplus-s2-pose-yarn": dict(
        label="LoRA+, S2-Attn, PoSE: rows of L spanning 4L, 4x batch, YaRN", pose=0.25, rope="yarn"
    ),
    "default-yarn": dict(
        label="toolkit default: LoRA+, S2-Attn with group schedule, NF4, YaRN",
        nf4=True,
        group_schedule="0.0625,0.1875,0.5",
        rope="yarn",
    ),
}
TARGETED = (
    "loraplus-s2-g50",
    "loraplus-s2-gsched-eq",
    "loraplus-s2-gsched-lin",  # their own sections
    "loraplus-s2-pose",
    "loraplus-s2-pose-g50",
    "loraplus-pose",
    "loraplus-s2-nf4-yarn",
    "loraplus-s2-gsched-eq-yarn",
    "lora-s2-yarn",
    "loraplus-s2-fullstep4-yarn",
    "loraplus-pose-yarn",
    "loraplus-s2-pose-yarn",
)
DEFAULT_VARIANTS = ",".join(v for v in VARIANTS if v not in TARGETED)
