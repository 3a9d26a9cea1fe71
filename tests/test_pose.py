"""PoSE (longqlora.data.pose): the position ids cover the target range, keep documents whole, compose with S2-Attn,
and a recipe trains with them end to end."""

import json

import pytest
import torch
from test_recipes import run
from transformers import LlamaForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from experiments import ablations
from experiments.ablations import AblationConfig, variant_settings
from longqlora.adapters import adapt_for_training
from longqlora.attention import layout as s2_layout
from longqlora.attention import s2_attention
from longqlora.data import pose
from longqlora.model import ModelConfig
from longqlora.training.tiny import tiny_llama_config


def one_document_rows(rows, window, target, chunks=2, seed=0):
    plain = torch.arange(window).repeat(rows, 1)
    return pose.skip_positions(plain, target, chunks, torch.Generator().manual_seed(seed))


def starts_of(lengths):
    return torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist()


def packed_batch(seed=0, rows=6, window=48):
    """TRL padding-free examples: rows of `window` tokens holding documents of random lengths (1 to window)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(rows):
        lengths, left = [], window
        while left:
            lengths.append(int(torch.randint(1, left + 1, (1,), generator=g)))
            left -= lengths[-1]
        examples.append({"input_ids": torch.randint(3, 300, (window,), generator=g).tolist(), "seq_lengths": lengths})
    return examples


# ---------------------------------------------------------------------------------------------- the position ids
def test_ids_cover_every_distance_of_the_target_and_stay_below_it():
    window, target = 32, 128
    pos = one_document_rows(3000, window, target)  # (3000, 32)
    assert int(pos.min()) == 0 and int(pos.max()) == target - 1
    assert bool((pos[:, 0] == 0).all()) and bool((pos.diff(dim=1) > 0).all())
    i, j = torch.triu_indices(window, window, 1)
    distances = (pos[:, None, :] - pos[:, :, None])[:, i, j]  # (rows, pairs)
    assert set(distances.unique().tolist()) == set(range(1, target))  # every distance in (0, target)
    # The skip is uniform on {0, ..., target - window} (PoSE §3): the last id averages window - 1 + 48 = 79.
    assert abs(float(pos[:, -1].float().mean()) - 79) < 3
    # About half of all pairs straddle the skip, so long distances are common, not a rare tail.
    assert 0.15 < float((distances >= target // 2).float().mean()) < 0.35


@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_chunks_are_contiguous_and_skips_only_increase(chunks):
    pos = one_document_rows(500, 40, 400, chunks=chunks, seed=chunks)
    steps = pos.diff(dim=1)
    assert bool((steps >= 1).all())
    jumps = (steps > 1).sum(dim=1)  # skips per row: one fewer than the chunks (a skip of 0 merges two; the
    assert int(jumps.max()) == chunks - 1 and float(jumps.float().mean()) > 0.85 * (chunks - 1)  # later ones pile up
    assert int(pos.max()) <= 399


def test_packed_documents_restart_at_zero_and_keep_their_own_skips():
    target = 200
    examples = packed_batch()
    trl = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    plain, got = trl(examples), pose.PoseCollator(trl, target, chunks=3, seed=7)(examples)
    for key in ("input_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx"):
        assert torch.equal(got[key], plain[key]), key  # only the position ids change
    assert got["max_length_q"] == plain["max_length_q"]
    pos = got["position_ids"][0]
    lengths = [n for e in examples for n in e["seq_lengths"]]
    skipped = 0
    for start, n in zip(starts_of(lengths), lengths):
        doc = pos[start : start + n]
        assert int(doc[0]) == 0 and bool((doc.diff() > 0).all()) and int(doc.max()) <= target - 1
        skipped += int((doc.diff() > 1).any())
    assert skipped >= 0.8 * sum(n >= 2 for n in lengths)
    # S2-Attn (and the varlen kernels' cu_seq_lens) see exactly the documents TRL packed: no skip is a boundary.
    starts = torch.zeros(len(pos), dtype=torch.bool)
    starts[starts_of(lengths)] = True
    assert torch.equal(s2_layout.document_starts(got["position_ids"])[0], starts)
    assert torch.equal(got["cu_seq_lens_q"][:-1].long(), (pos == 0).nonzero().flatten())


def test_padded_rows_are_one_document_each_and_padding_stays_at_zero():
    trl = DataCollatorForLanguageModeling(pad_token_id=0)
    examples = [{"input_ids": list(range(1, 31))}, {"input_ids": list(range(1, 13))}]
    got = pose.PoseCollator(trl, 120, seed=1)(examples)
    pos, mask = got["position_ids"], got["attention_mask"].bool()
    assert pos.shape == (2, 30) and bool((pos[~mask] == 0).all())
    for row, n in ((0, 30), (1, 12)):
        assert int(pos[row, 0]) == 0 and bool((pos[row, :n].diff() > 0).all()) and int(pos[row, :n].max()) < 120
    assert int(pos[0, -1]) > 29  # the 30-token row skipped (odds of no skip: 1 in 91)


def test_skips_are_seeded_by_the_seed_and_the_batch_not_the_call_order():
    trl = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    a, b = packed_batch(seed=1), packed_batch(seed=2)
    first = pose.PoseCollator(trl, 500, seed=3)
    a1, b1 = first(a)["position_ids"], first(b)["position_ids"]
    second = pose.PoseCollator(trl, 500, seed=3)
    b2, a2 = second(b)["position_ids"], second(a)["position_ids"]
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(pose.PoseCollator(trl, 500, seed=4)(a)["position_ids"], a1)


def test_ids_that_do_not_restart_at_zero_are_refused():
    with pytest.raises(ValueError, match="position 0"):
        pose.skip_positions(torch.arange(5, 15)[None], 100, 2, torch.Generator())
    with pytest.raises(ValueError, match="not 0, 1, 2"):
        pose.skip_positions(torch.tensor([[0, 1, 5, 6]]), 100, 2, torch.Generator())


# ------------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(pose_window=8192), "--pose_window"),
        (dict(pose_window=-1), "--pose_window"),
        (dict(pose_window=2048, pose_chunks=1), "--pose_chunks"),
        (dict(pose_window=4, pose_chunks=5), "--pose_chunks"),
        (dict(pose_window=2048, s2_shift="rolled"), "--s2_shift"),
    ],
)
def test_bad_pose_settings_name_their_flag(kwargs, flag):
    with pytest.raises(ValueError, match=f"^{flag} "):
        ModelConfig(model_name_or_path="m", target_context=8192, **kwargs)


def test_s2_groups_are_a_share_of_the_window():
    cfg = ModelConfig(model_name_or_path="m", target_context=8192, pose_window=2048, s2_group_schedule="none")
    assert cfg.train_length == 2048 and cfg.group_size == 512 and cfg.group_sizes == [512]
    assert ModelConfig(model_name_or_path="m", target_context=8192).group_sizes == [512, 1536, 4096]


# -------------------------------------------------------------------------------------------- with S2-Attn
def reference(q, k, v, lengths, group, shifted_from, valid=None):
    """S2 written from its definition, one (query, key) pair at a time: causal, inside one document, and in one
    group of G tokens counted from the document's first token (heads from `shifted_from` on offset by G/2)."""
    b, h, n, d = q.shape
    doc, idx = [], []
    for i, length in enumerate(lengths):
        doc += [i] * length
        idx += list(range(length))
    rep = h // k.shape[1]
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for head in range(h):
        shift = group // 2 if head >= shifted_from else 0
        allowed = torch.tensor(
            [
                [
                    j <= i and doc[i] == doc[j] and (idx[i] + shift) // group == (idx[j] + shift) // group
                    for j in range(n)
                ]
                for i in range(n)
            ]
        )
        for row in range(b):
            see = allowed if valid is None else allowed & valid[row][None, :]
            scores = q[row, head] @ k[row, head // rep].T / d**0.5
            probs = torch.nan_to_num(scores.masked_fill(~see, float("-inf")).softmax(-1))
            out[row, head] = probs @ v[row, head // rep]
    return out if valid is None else out * valid[:, None, :, None]


@pytest.mark.parametrize("h,h_kv,group", [(4, 2, 8), (3, 1, 6), (4, 4, 64)])
def test_s2_on_pose_rows_equals_the_explicit_mask(h, h_kv, group):
    lengths = [13, 1, 30, 20]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, x, sum(lengths), 8, generator=g, dtype=torch.float64) for x in (h, h_kv, h_kv))
    plain = torch.cat([torch.arange(n) for n in lengths])[None].expand(2, -1)
    ids = pose.skip_positions(plain, 400, 3, g)
    assert int((ids.diff(dim=1) > 1).sum()) >= 4  # skips inside documents
    want = reference(q, k, v, lengths, group, shifted_from=h // 2)
    got = s2_attention(q, k, v, group, position_ids=ids)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # The attention never reads the id values, only the documents and groups they mark: PoSE ids equal plain ones.
    torch.testing.assert_close(got, s2_attention(q, k, v, group, position_ids=plain), atol=0, rtol=0)
    # PoSE with full attention (every head full): causal inside each document, across its skips.
    full = reference(q, k, v, lengths, 10**6, shifted_from=h)
    torch.testing.assert_close(
        s2_attention(q, k, v, group, position_ids=ids, full_heads=1.0), full, atol=1e-10, rtol=1e-10
    )


def test_s2_on_padded_pose_rows_equals_the_explicit_mask():
    trl = DataCollatorForLanguageModeling(pad_token_id=0)
    batch = pose.PoseCollator(trl, 300, seed=2)([{"input_ids": list(range(1, 41))}, {"input_ids": list(range(1, 26))}])
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, x, 40, 8, generator=g, dtype=torch.float64) for x in (4, 2, 2))
    valid = batch["attention_mask"].bool()
    got = s2_attention(q, k, v, 8, position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(got, reference(q, k, v, [40], 8, shifted_from=2, valid=valid), atol=1e-10, rtol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen kernels run on CUDA only")
def test_gpu_kernels_on_pose_rows_match_the_cpu_path():
    lengths = [300, 1, 700, 23]
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, x, sum(lengths), 64, generator=g) for x in (8, 2, 2))
    plain = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = pose.skip_positions(plain, 8192, 2, g)
    want = s2_attention(q.double(), k.double(), v.double(), 256, position_ids=ids)  # the banded path, as above
    got = s2_attention(*(t.cuda().bfloat16() for t in (q, k, v)), 256, position_ids=ids.cuda())
    torch.testing.assert_close(got.float().cpu(), want.float(), atol=2e-2, rtol=2e-2)


def test_full_attention_with_pose_keeps_documents_whole_in_a_model():
    """--s2_attention false with PoSE: packed documents each see their own past across the skips, as one document
    run alone would; transformers' own mask (a skip = a new sequence) would not."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config("gqa", vocab_size=320, max_position_embeddings=64)).float()
    cfg = ModelConfig(
        model_name_or_path="m",
        target_context=256,
        pose_window=64,
        s2_attention=False,
        lora_r=4,
        lora_dropout=0.0,
        trainable_params="",
    )
    lengths = [25, 39]
    ids = torch.randint(3, 320, (1, 64), generator=torch.Generator().manual_seed(1))
    plain = torch.cat([torch.arange(n) for n in lengths])[None]
    pos = pose.skip_positions(plain, 256, 2, torch.Generator().manual_seed(2))
    with torch.no_grad():
        bare = model(input_ids=ids, position_ids=pos).logits  # transformers' sdpa mask
        peft, _ = adapt_for_training(model, cfg, torch.float32, gradient_checkpointing=False)
        peft.train()
        packed = peft(input_ids=ids, position_ids=pos).logits
        peft.eval()
        alone = [
            peft(input_ids=ids[:, s : s + n], position_ids=pos[:, s : s + n], attention_mask=torch.ones(1, n)).logits
            for s, n in zip(starts_of(lengths), lengths)
        ]
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=1e-5, rtol=1e-4)
    assert float((bare - packed).abs().max()) > 1e-2  # what the S2 op's document rule avoids


# ------------------------------------------------------------------------------------------------- the recipes
def test_dry_run_names_pose_and_plans_the_shorter_rows(capsys):
    run("extend_7b_8k", "--dry_run")
    plain = capsys.readouterr().out
    run("extend_7b_8k", "--dry_run", "--pose_window", "2048")
    text = capsys.readouterr().out
    assert "PoSE: rows of 2048 tokens, position ids skipping to span 8192 (2 chunks per document" in text
    assert "S2-Attn, group 128 -> 384 -> 1024" in text and "PoSE" not in plain

    def peak(out):
        return float(out.split("memory (planned)   peak ")[1].split(" GiB")[0])

    assert peak(text) < peak(plain)


def test_tiny_recipe_trains_with_pose(tmp_path, monkeypatch):
    seen = []
    original = pose.skip_positions
    monkeypatch.setattr(pose, "skip_positions", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    out = run(
        "extend_7b_8k", "--tiny", "--pose_window", "2048", "--max_steps", "2", "--output_dir", str(tmp_path / "pose")
    )
    extension = json.loads((out / "longqlora_extension.json").read_text())
    assert extension["pose"] == {"window": 64, "chunks": 2} and extension["target_context"] == 256
    # the groups the 2 steps trained: the schedule's 4, 12, 32 share the steps in thirds, so 32 is never reached
    assert "group_size" not in extension and extension["s2_options"]["group_sizes"] == [4, 12]
    assert len(seen) >= 4  # 2 steps x 2 accumulated batches, every one through PoSE (the loader reads ahead)
    assert all(p.shape == (1, 64) for p in seen)  # rows of the window, not the target
    ids = torch.cat(seen)
    assert int(ids.max()) <= 255 and int(ids.max()) > 63 and (out / "adapter_model.safetensors").exists()


def test_ablation_pose_variants_train_on_quarter_rows_at_equal_tokens(tmp_path):
    cfg = AblationConfig(tiny=True)

    def tokens_per_step(vid):
        s = variant_settings(cfg, vid)
        model = ablations._model_config(cfg, tmp_path, s)
        return model.train_length, ablations._training(cfg, tmp_path, 0, s).per_device_train_batch_size

    assert tokens_per_step("loraplus-s2") == (256, 8)
    for vid in ("loraplus-s2-pose", "loraplus-s2-pose-g50", "loraplus-pose"):
        assert tokens_per_step(vid) == (64, 32), vid
    assert not variant_settings(cfg, "loraplus-pose")["s2"]
    assert "pose" not in variant_settings(cfg, "loraplus-s2")  # the other variants' cached results keep their keys


def test_conversations_refuse_pose(capsys):
    with pytest.raises(SystemExit) as exit_:
        run("sft_vicuna_13b_8k", "--dry_run", "--pose_window", "2048")
    assert (
        exit_.value.code == 2
        and "error: --pose_window 2048: PoSE trains on rows cut from long text" in capsys.readouterr().err
    )
