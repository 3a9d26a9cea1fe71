"""Memory switches (longqlora.training.memory) give the plain path's loss and gradients; the benchmark's tiny mode
runs."""

import contextlib
import types

import pytest
import torch

from longqlora.model import ModelConfig, load_model
from longqlora.training import memory
from longqlora.training.tiny import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("mem") / "gqa", shape="gqa")


def adapted(path, **kw):
    """The NF4 LoRA+ training model (S2-Attn, checkpointing), dropout off unless asked (deterministic grads)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        model_name_or_path=str(path),
        target_context=512,
        compute_dtype=kw.pop("compute_dtype", "float32"),
        lora_dropout=kw.pop("lora_dropout", 0.0),
        **kw,
    )
    model, _, _ = load_model(cfg)
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model


def step(model, ids, ctx=None, **kw):
    """Loss and {name: grad} of one forward/backward."""
    model.zero_grad(set_to_none=True)
    with ctx or contextlib.nullcontext():
        out = model(input_ids=ids, labels=ids, **kw)
        out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert torch.allclose(loss_a, loss_b, rtol=tol, atol=tol), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        scale = grads_a[name].abs().max().clamp(min=1e-12)
        assert (grads_a[name] - grads_b[name]).abs().max() / scale < tol, name


def test_tiled_mlp_same_loss_and_gradients(tiny_dir):
    model = adapted(tiny_dir, lora_target="all-linear")
    ids = torch.randint(3, 320, (2, 384))
    plain = step(model, ids)
    assert memory.enable_tiled_mlp(model, tile_tokens=100) == 2
    tiled = step(model, ids)
    assert_same(plain, tiled, 1e-5)  # fp32: the tiles change the summation order only
    lora_mlp = [n for n in tiled[1] if "mlp" in n and "lora" in n]
    assert lora_mlp and all(tiled[1][n].abs().sum() > 0 for n in lora_mlp)
    memory.disable_recompute(model)
    assert_same(plain, step(model, ids), 1e-6)
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m).__name__.endswith("MLP"))
    # an instance forward of another's from before (a hook's) is put back, not dropped with ours
    mlp = next(m for m in model.modules() if type(m).__name__.endswith("MLP"))
    own = types.MethodType(lambda self, x: type(self).forward(self, x) * 1.0, mlp)
    mlp.forward = own
    memory.enable_tiled_mlp(model, tile_tokens=100)
    memory.disable_recompute(model)
    assert mlp.__dict__["forward"] is own


def test_tiled_mlp_replays_dropout_masks(tiny_dir, monkeypatch):
    """With LoRA dropout on the MLP, the backward's recomputed tiles must draw the forward's masks: the gradients
    equal those of the same tiles run with ordinary autograd (same RNG draws, everything kept)."""
    model = adapted(tiny_dir, lora_target="all-linear", lora_dropout=0.3)
    memory.enable_tiled_mlp(model, tile_tokens=100)
    ids = torch.randint(3, 320, (2, 384))
    torch.manual_seed(1)
    tiled = step(model, ids)
    monkeypatch.setattr(
        memory._Recomputed,
        "apply",
        lambda x, run, tile, *params: torch.cat([run(p) for p in x.split(tile, dim=-2)], dim=-2),
    )
    torch.manual_seed(1)
    reference = step(model, ids)
    assert_same(reference, tiled, 1e-5)
    torch.manual_seed(2)
    assert not torch.allclose(step(model, ids)[0], tiled[0])  # dropout is really on


@pytest.mark.parametrize("trainable", ["embed,norm", ""])
def test_recomputed_norms_same_loss_and_gradients(tiny_dir, trainable):
    model = adapted(tiny_dir, trainable_params=trainable)
    ids = torch.randint(3, 320, (2, 384))
    plain = step(model, ids)
    assert memory.recompute_norms(model, tile_tokens=100) == (10 if trainable else 5)  # 5 norms, + trained copies
    assert_same(plain, step(model, ids), 1e-5)
    memory.disable_recompute(model)
    assert_same(plain, step(model, ids), 1e-6)


def test_recomputed_norms_save_only_their_input(tiny_dir):
    """What one decoder layer saves for its backward (bf16 autocast, as on a GPU), with and without recomputed norms:
    each of the two norms keeps its 16-bit input (2 bytes a value) instead of an fp32 copy of it and its 16-bit
    normalised output (6 bytes)."""
    cfg = ModelConfig(model_name_or_path=str(tiny_dir), target_context=512, compute_dtype="bfloat16")
    model, _, _ = load_model(cfg, gradient_checkpointing=False)
    model.train()
    base = model.get_base_model().model
    x = torch.randn(1, 512, 128, dtype=torch.bfloat16, requires_grad=True)
    rope = base.rotary_emb(x, torch.arange(512)[None])

    def saved_bytes():
        sizes = {}
        with (
            torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
                lambda t: t,
            ),
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            base.layers[0](x, position_embeddings=rope)
        return sum(sizes.values())

    before = saved_bytes()
    assert memory.recompute_norms(model) == 10
    after = saved_bytes()
    assert before - after >= 2 * 512 * 128 * (6 - 2), (before, after)


def test_recomputed_lora_dropout_same_loss_and_gradients(tiny_dir):
    """Dropout drawn inside LoRA's A: the same masks as PEFT's own dropout (same RNG draws), so the same loss and
    gradients, and no dropped copies saved."""
    model = adapted(tiny_dir, lora_dropout=0.3)
    ids = torch.randint(3, 320, (2, 256))
    torch.manual_seed(3)
    plain = step(model, ids)
    assert memory.recompute_lora_dropout(model) == 8  # q, k, v, o in 2 layers
    torch.manual_seed(3)
    assert_same(plain, step(model, ids), 1e-5)
    torch.manual_seed(4)
    assert not torch.allclose(step(model, ids)[0], plain[0])  # dropout is really on
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
    memory.disable_recompute(model)
    with torch.no_grad():
        assert torch.equal(a, model(input_ids=ids).logits)  # eval: no dropout either way


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_gpu_every_switch_gives_the_plain_loss_and_gradients(tiny_dir, dtype, tol):
    """On CUDA, what the CPU tests drive through stand-ins runs for real: bitsandbytes' CUDA NF4, TRL's offloading
    with pinned buffers on its side stream, the tiled MLP, the recomputed norms and the redrawn LoRA dropout
    replaying CUDA's RNG under CUDA autocast. All at once they give the plain path's loss and gradients."""
    model = adapted(tiny_dir, lora_dropout=0.3, compute_dtype=dtype)
    ids = torch.randint(3, 320, (2, 384), device="cuda")

    @contextlib.contextmanager
    def under(manager=None):
        torch.manual_seed(3)  # the same dropout masks on both paths
        with torch.autocast("cuda", dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            with manager or contextlib.nullcontext():
                yield

    plain = step(model, ids, under())
    assert memory.enable_tiled_mlp(model, tile_tokens=100) == 2
    assert memory.recompute_norms(model, tile_tokens=100) > 0 and memory.recompute_lora_dropout(model) == 8
    manager = memory.offload_context(model, memory.offload_threshold_bytes("on", 0, 0, 0))
    moved = []
    model.register_forward_hook(lambda *a: moved.append(memory.offloaded_bytes(manager)))
    switched = step(model, ids, under(manager))
    one = 2 * 384 * 128 * (4 if dtype == "float32" else 2)  # one layer's checkpointed input
    assert moved[-1] >= 2 * one  # the checkpointed layer inputs went to pinned host buffers
    assert_same(plain, switched, tol)
    every = moved[-1]
    manager = memory.offload_context(model, memory.offload_threshold_bytes("on", 0, 0, 0), layers=1)  # --offload_layers
    assert_same(plain, step(model, ids, under(manager)), tol)
    assert one <= moved[-1] <= every - one  # the second layer's input stayed on the GPU


def test_tiled_mlp_auto_starts_at_its_threshold():
    assert memory.tiled_mlp_active("auto", 16384, 16384) and not memory.tiled_mlp_active("auto", 16383, 16384)
    assert memory.tiled_mlp_active("on", 1, 16384) and not memory.tiled_mlp_active("off", 1 << 20, 16384)


def test_tiled_mlp_falls_back_below_its_threshold(tiny_dir, monkeypatch):
    model = adapted(tiny_dir)
    memory.enable_tiled_mlp(model, tile_tokens=64, min_tokens=10_000)
    calls = []
    monkeypatch.setattr(memory._Recomputed, "apply", lambda *a: calls.append(1))
    step(model, torch.randint(3, 320, (1, 256)))  # 256 tokens < 10,000: the plain MLP runs
    assert calls == []


@pytest.fixture
def cpu_offload(monkeypatch):
    """TRL's offloading manager driven on a CPU (taken for the accelerator): every qualifying saved tensor is
    copied to a separate host buffer and copied back for the backward, as it would be from a GPU."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "empty_cache", lambda: None, raising=False)  # TRL calls it on every step
    return lambda model, threshold: memory.offload_context(model, threshold, pin_memory=False, use_streams=False)


def test_offload_same_loss_and_gradients(tiny_dir, cpu_offload):
    model = adapted(tiny_dir)
    ids = torch.randint(3, 320, (1, 512))
    plain = step(model, ids)
    manager = cpu_offload(model, memory.offload_threshold_bytes("on", 0, 0, 0))
    moved = []
    model.register_forward_hook(lambda *a: moved.append(memory.offloaded_bytes(manager)))
    offloaded = step(model, ids, manager)
    assert_same(plain, offloaded, 1e-6)
    # at least every checkpointed layer input (2 layers x 512 tokens x 128 fp32) went to the host
    assert moved[-1] >= 2 * 512 * 128 * 4


def test_offload_auto_keeps_short_batches_on_the_device(tiny_dir, cpu_offload):
    from trl.trainer.utils import add_fused_lm_head

    model = adapted(tiny_dir)
    add_fused_lm_head(model.get_base_model())  # the training loss, as SFTTrainer sets it up
    threshold = memory.offload_threshold_bytes("auto", 1024, 128, 4)  # batches of 1024+ tokens
    assert threshold == 1024 * 128 * 4
    manager = cpu_offload(model, threshold)
    moved = []
    model.register_forward_hook(lambda *a: moved.append(memory.offloaded_bytes(manager)))
    step(model, torch.randint(3, 320, (1, 512)), manager, fused_lm_head=True)
    assert moved[-1] == 0  # 512 tokens: plain checkpointing
    step(model, torch.randint(3, 320, (1, 1024)), manager, fused_lm_head=True)
    assert moved[-1] >= 2 * 1024 * 128 * 4


def test_offload_keeps_the_fused_loss_on_the_device(tiny_dir, cpu_offload):
    """TRL's fused LM head never calls lm_head, so TRL's own no-offload hooks on it do not fire: ours keep
    everything from the final norm on (the final hidden states the loss saves) on the device. What goes to the host
    is the input ids and the two checkpointed layer inputs."""
    from trl.trainer.utils import add_fused_lm_head

    model = adapted(tiny_dir)
    add_fused_lm_head(model.get_base_model())
    manager = cpu_offload(model, memory.offload_threshold_bytes("on", 0, 0, 0))
    shapes = []
    model.register_forward_hook(
        lambda *a: shapes.append(sorted(tuple(t.shape) for t, moved, *_ in manager.tracker.values() if moved))
    )
    ids = torch.randint(3, 320, (1, 512))
    plain = step(model, ids, fused_lm_head=True)
    assert_same(plain, step(model, ids, manager, fused_lm_head=True), 1e-6)
    assert shapes[-1] == [(1, 512), (1, 512, 128), (1, 512, 128)]
    step(model, ids, manager, fused_lm_head=True)  # a second step: the no-offload region opened and closed again
    assert shapes[-1] == [(1, 512), (1, 512, 128), (1, 512, 128)]
    step(model, ids, fused_lm_head=True)  # outside the context no hook is left installed
    assert shapes[-1] == []


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("mem") / "deep", shape="gqa", num_hidden_layers=4)


@pytest.mark.parametrize("layers", [None, 2, 0])
def test_offload_layers_offloads_only_the_first_layers(deep_dir, cpu_offload, layers):
    """--offload_layers N on a 4-layer model: what goes to the host is the input ids and exactly the inputs of
    decoder layers 0..N-1 (matched by value), nothing after them; the loss and gradients are the plain path's, on
    two steps in a row (the model's pre-hook resets the threshold the previous forward left behind)."""
    from trl.trainer.utils import add_fused_lm_head

    model = adapted(deep_dir)
    add_fused_lm_head(model.get_base_model())
    cpu_offload(model, None)  # the fixture's patches; the manager is built below with the split
    manager = memory.offload_context(
        model, memory.offload_threshold_bytes("on", 0, 0, 0), layers=layers, pin_memory=False, use_streams=False
    )
    inputs, moved = [], []
    for block in model.get_base_model().model.layers:
        block.register_forward_pre_hook(
            lambda m, args, kwargs: inputs.append((args[0] if args else kwargs["hidden_states"]).detach().clone()),
            with_kwargs=True,
        )
    model.register_forward_hook(lambda *a: moved.append([t for t, m, *_ in manager.tracker.values() if m]))
    ids = torch.randint(3, 320, (1, 512))
    plain = step(model, ids, fused_lm_head=True)
    for _ in range(2):
        inputs.clear()
        assert_same(plain, step(model, ids, manager, fused_lm_head=True), 1e-6)
        first = inputs[:4]  # the forward's four layers (a recomputation, if it fires hooks, comes after)
        hidden = [t for t in moved[-1] if t.dim() == 3]
        which = sorted(i for i, x in enumerate(first) for t in hidden if torch.equal(t, x))
        assert which == list(range(4 if layers is None else layers)) and len(hidden) == len(which)
        assert sum(t.dim() == 2 for t in moved[-1]) == (0 if layers == 0 else 1)  # the input ids


def test_tiled_mlp_recomputation_is_not_offloaded(tiny_dir):
    """The tiles recomputed inside the tiled MLP's backward save tensors that are used at once; an outer
    saved-tensor hook (an offloading context) must see none of them."""
    model = adapted(tiny_dir, lora_target="all-linear")
    memory.enable_tiled_mlp(model, tile_tokens=100)
    phase, packed = ["forward"], []

    def pack(t):
        packed.append(phase[0])
        return t

    ids = torch.randint(3, 320, (1, 384))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
        phase[0] = "backward"
        loss.backward()
    assert "forward" in packed and "backward" not in packed


def test_offload_is_a_null_context_without_an_accelerator(tiny_dir):
    if torch.accelerator.current_accelerator() is not None:
        pytest.skip("an accelerator is present")
    model = adapted(tiny_dir)
    assert isinstance(memory.offload_context(model, 1024), contextlib.nullcontext)
    assert isinstance(memory.offload_context(model, None), contextlib.nullcontext)


def test_chunked_loss_equals_the_plain_loss_in_one_forward(tiny_dir, tmp_path):
    """TRL's fused head (the default) against `--chunked_loss false`'s trainer (the model's own loss from full
    logits): same loss and gradients, and the plain path runs one forward per step (TRL's deprecated
    `compute_loss_func` ran a second one)."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from longqlora.adapters import trainable_to_fp32

    model = adapted(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = torch.randint(3, 320, (2, 256))
    labels = ids.clone()
    labels[:, :40] = -100
    calls = []
    model.get_base_model().register_forward_pre_hook(lambda *_: calls.append(1))
    results = {}
    for chunked in (False, True):
        args = SFTConfig(
            output_dir=str(tmp_path / str(chunked)),
            report_to=[],
            use_cpu=True,
            bf16=False,
            max_length=256,
            activation_checkpointing=True,
        )
        data = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
        trainer = memory.trainer_class(chunked)(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        assert (type(trainer).__name__ == "SFTTrainer") == chunked
        trainable_to_fp32(trainer.model)  # as train() does: TRL casts PEFT's trained copies to bf16
        model.zero_grad(set_to_none=True)
        calls.clear()
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels.clone()}
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        assert len(calls) == 1, chunked
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[chunked] = (loss.detach(), grads)
    assert_same(results[False], results[True], 1e-4)


@pytest.mark.parametrize(
    "flag,value",
    [
        ("offload_activations", "always"),
        ("tiled_mlp", "yes"),
        ("offload_min_tokens", 0),
        ("tiled_mlp_tokens", 0),
        ("offload_layers", -1),
    ],
)
def test_training_config_rejects_bad_switches(flag, value):
    from longqlora.training.config import TrainingConfig

    with pytest.raises(ValueError, match=f"--{flag}") as err:
        TrainingConfig(output_dir="/tmp/x", **{flag: value})
    assert "\n" not in str(err.value)


def test_recipe_runs_with_every_switch(tmp_path, script):
    """The tiny 7B recipe with offloading, the tiled MLP and the plain loss: trains, writes the adapter, and the
    plan is in the extension record."""
    import json

    from longqlora.cli import run_recipe

    recipe = script("recipes/extend_7b_8k.py")
    out = run_recipe(
        recipe.Model,
        recipe.Data,
        recipe.Training,
        [
            "--tiny",
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "2",
            "--offload_activations",
            "on",
            "--tiled_mlp",
            "on",
            "--tiled_mlp_tokens",
            "96",
            "--chunked_loss",
            "false",
            "--offload_layers",
            "1",
        ],
    )
    record = json.loads((out / "longqlora_extension.json").read_text())
    assert record["memory_plan"]["switches"] == {"offload": True, "chunked_loss": False, "tiled_mlp": True}
    assert record["memory_plan"]["offload_layers"] == 1 < record["memory_plan"]["layers"]
    assert record["train"]["steps"] == 2 and record["train"]["mean_loss"] > 0


def test_memory_bench_tiny(tmp_path, script):
    """The benchmark's CPU mode at two depths: every point measured, the depth fit exact at two depths, the JSON
    record holding what the planner's calibration test reads."""
    import json

    bench = script("bench/memory.py")
    out = tmp_path / "memory.md"
    bench.main(
        [
            "--tiny",
            "--contexts",
            "128",
            "--layers",
            "1",
            "2",
            "--variants",
            "ours",
            "baseline",
            "--steps",
            "2",
            "--output",
            str(out),
            "--json",
            str(tmp_path / "memory.json"),
        ]
    )
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 4 + 2 + 4 and "bench/memory.py --tiny" in text  # 4 points, 2 fits, 4 timed points
    speed = [line.split("|")[4:7] for line in rows[-4:]]
    assert [v.strip() for v, _, _ in speed] == ["ours", "baseline", "ours", "baseline"]
    assert all(float(r.strip()) == 1.0 for v, _, r in speed if v.strip() == "ours")
    record = json.loads((tmp_path / "memory.json").read_text())
    points = record["points"]
    assert {(p["layers"], p["variant"]) for p in points} == {(1, "ours"), (2, "ours"), (1, "baseline"), (2, "baseline")}
    assert all(p["peak_bytes"] > 0 and p["tokens_per_s"] > 0 and p["dtype"] == "bfloat16" for p in points)
    assert all(p["timed_steps"] == 1 for p in points)  # 2 steps: the tracked one is not timed
    for fit in record["fits"]:
        one, two = (
            next(p["peak_bytes"] for p in points if p["variant"] == fit["variant"] and p["layers"] == n) for n in (1, 2)
        )
        assert fit["per_layer_bytes"] == pytest.approx(two - one)
        assert fit["extrapolated_bytes"] == pytest.approx(one + (fit["full_layers"] - 1) * (two - one))


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--layers", "0"], "--layers"),
        (["--variants", "bogus"], "--variants"),
        (["--report_from", "/no/x.json"], "--report_from"),
    ],
)
def test_memory_bench_bad_flags_end_in_one_line(script, capsys, flags, named):
    """A bad flag ends the bench in one line naming it, exit 2, not a traceback."""
    with pytest.raises(SystemExit) as exit_:
        script("bench/memory.py").main(flags)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {named} ")


def test_memory_bench_packed_rows_take_the_per_document_path(script, monkeypatch):
    """--rows packed: four documents a row, their position ids restarting, reach S2's packed path (each document
    run apart where no varlen kernel is, as on this CPU) and are measured; plain rows never reach it."""
    import torch

    from longqlora.attention.layout import RowLayout

    bench = script("bench/memory.py")
    seen, spans = [], RowLayout.document_spans
    monkeypatch.setattr(RowLayout, "document_spans", lambda self: seen.append(spans(self)) or seen[-1])
    points = {}
    for rows in ("plain", "packed"):
        cfg = bench.BenchConfig(tiny=True, contexts=[256], variants=["ours"], steps=1, rows=rows)
        points[rows] = bench.measure("tiny", None, "ours", 256, cfg, torch.device("cpu"), torch.float32)
        if rows == "plain":
            assert not seen
    assert points["packed"]["rows"] == "packed" and points["packed"]["peak_bytes"] > 0
    assert seen and all(s == [[(0, 64), (64, 128), (128, 192), (192, 256)]] for s in seen)


def test_the_bench_counts_what_a_step_allocates_and_frees_inside_a_function(script):
    """bench/memory_step.tracked_live, the CPU peak of every bench: tensors made and freed inside an autograd
    Function's forward and backward (TRL's fused loss, the optimizer's step) counted at the moment they live (the
    profiler's events, read in order, booked those frees before the allocations); a tensor made before the step
    and updated in place (DDP's buckets) not counted, known ones (the model, the optimizer) not either."""
    import torch

    step = script("bench/memory_step.py")
    mib = 2**18  # fp32 values in 1 MiB

    class FourCopies(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            copies = [x.repeat(1, 1) * k for k in range(4)]  # 4 MiB alive at once (and a repeat), then freed
            return sum(c.sum() for c in copies)

        @staticmethod
        def backward(ctx, grad):
            wide = torch.ones(8 * mib).mul_(grad)  # 8 MiB in the backward
            return wide[:mib].reshape(1, mib)

    x = torch.zeros(1, mib, requires_grad=True)
    made_before = torch.zeros(16 * mib)  # 16 MiB that the step only updates in place
    weight = torch.nn.Linear(512, 512)  # known: its update is no new memory either

    def run():
        FourCopies.apply(x).backward()
        made_before.add_(1)
        made_before[:mib].copy_(x.grad.flatten())
        with torch.no_grad():
            weight.weight.mul_(0.5)
        x.grad = None

    peak, left = step.tracked_live(run, weight)
    assert 8 * 2**20 <= peak < 10 * 2**20  # the backward's 8 MiB (and its 1 MiB gradient), not 16 MiB more
    assert left == 0
    forward_only = step.tracked_live(lambda: FourCopies.apply(x.detach()))[0]
    assert forward_only == 5 * 2**20  # the 4th product beside its repeat and the 3 before it


def test_bench_ratios_stay_within_a_command_and_a_rerun_replaces_its_own_points(script, tmp_path):
    """Speed ratios compare points of one command's run only (a later session's `ours` at the same length must not
    become an earlier run's reference); merging a JSON replaces a point measured again by the same command (or one
    recorded without its command), keeps another command's, and keeps a different --offload_layers split apart."""
    import json

    report = script("bench/memory.py").memory_report

    def point(command, variant, tps, split=None):
        return {
            "model": "m", "layers": 2, "variant": variant, "context": 1024, "rows": "plain", "dtype": "bfloat16",
            "tokens_per_s": tps, "timed_steps": 1, "command": command, "plan": {"offload_layers": split},
        }  # fmt: skip

    first = [point("a", "ours", 100.0), point("a", "baseline", 50.0)]
    rows = report.speed_rows(first + [point("b", "ours", 400.0)])
    assert [r[-1] for r in rows] == ["1.00", "2.00", "1.00"]
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"commands": ["a"], "points": first + [point(None, "ours_lora", 1.0)], "fits": []}))
    merged = report.merge_record(
        str(path), {"command": "b", "points": [point("b", "ours", 1.0), point("b", "ours_lora", 2.0)], "fits": []}
    )
    assert [(p["command"], p["variant"]) for p in merged["points"]] == [
        ("a", "ours"), ("a", "baseline"), ("b", "ours"), ("b", "ours_lora"),
    ]  # fmt: skip
    again = report.merge_record(str(path), {"command": "a", "points": [point("a", "ours", 3.0, split=1)], "fits": []})
    assert [(p["command"], p["variant"], p["plan"]["offload_layers"]) for p in again["points"]] == [
        ("a", "ours", None), ("a", "baseline", None), (None, "ours_lora", None), ("a", "ours", 1),
    ]  # fmt: skip


def test_the_depth_fits_gpu_column_reads_the_gpu_record_where_a_point_matches(script):
    """The fits' last column: a GPU point at the same model, context, variant and full depth gives its peak allocated
    / reserved; another context, a partial depth, an --offload_layers split or no record give 'not yet measured'."""
    report = script("bench/memory.py").memory_report
    gib = 2**30

    def point(layers, variant, context, peak, **kw):
        return {
            "model": "m", "layers": layers, "variant": variant, "context": context, "rows": "plain",
            "dtype": "bfloat16", "device": kw.pop("device", "cpu"), "peak_bytes": peak, "reserved_bytes": None,
            "tokens_per_s": 1.0, **kw,
        }  # fmt: skip

    cpu = [point(n, v, c, n * gib) for v in ("ours", "baseline") for c in (1024, 2048) for n in (2, 4)]
    gpu = {
        "machine": "NVIDIA H200",
        "points": [
            point(8, "ours", 1024, 3 * gib, device="cuda", reserved_bytes=4 * gib),
            point(4, "ours", 2048, 5 * gib, device="cuda", reserved_bytes=6 * gib),  # not the full depth
            point(8, "baseline", 1024, 5 * gib, device="cuda", reserved_bytes=6 * gib, plan={"offload_layers": 3}),
        ],
    }
    plan = lambda *a, **k: {"peak_allocated_gib": 1.0, "device_need_gib": 2.0}  # noqa: E731

    def column(record):
        text, _ = report.report(cpu, [], None, [], plan, lambda name: 8, "CPU", record)
        rows = [r.split("|") for r in text.splitlines() if r.startswith("| m |") and r.count("|") == 11]
        return {(r[3].strip(), int(r[2])): r[10].strip() for r in rows}

    assert column(gpu) == {
        ("ours", 1024): "3.00 / 4.00",
        ("ours", 2048): "not yet measured",
        ("baseline", 1024): "not yet measured",
        ("baseline", 2048): "not yet measured",
    }
    assert set(column(None).values()) == {"not yet measured"}


def test_float16_trains_fp32_masters_under_a_grad_scaler(tiny_dir, tmp_path):
    """The V100 path: fp16 compute with fp32 trainable parameters. After the Trainer is built (TRL casts PEFT's
    trained copies to 16 bits) and `trainable_to_fp32`, every trained parameter and its gradient is fp32, so
    fp16 mixed precision's GradScaler can unscale them (it refuses fp16 gradients), and they are finite."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from longqlora.adapters import trainable_to_fp32

    model = adapted(tiny_dir, compute_dtype="float16")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    args = SFTConfig(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=256, activation_checkpointing=True
    )
    data = datasets.Dataset.from_dict({"input_ids": [[1] * 8]})
    trainer = memory.trainer_class(True)(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainable_to_fp32(trainer.model)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[-3] for n, _ in trained} >= {"lora_A", "lora_B"}
    assert [n for n, p in trained if p.dtype != torch.float32] == []
    ids = torch.randint(3, 320, (1, 256))
    optimizer = torch.optim.AdamW([p for _, p in trained], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=ids, labels=ids).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # raises "Attempting to unscale FP16 gradients" for a 16-bit trained parameter
    grads = [p.grad for _, p in trained if p.grad is not None]
    assert len(grads) == len(trained)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    before = [p.detach().clone() for _, p in trained]
    scaler.step(optimizer)
    assert any(not torch.equal(b, p) for b, (_, p) in zip(before, trained))


def test_the_trace_puts_every_op_of_a_step_in_a_phase(script):
    """bench/memory_trace.py: each phase's highest live total, seen after every op of the tracked step; the highest
    of them is the step's tracked peak (bench/memory.py's figure above what was resident), and each decoder layer's
    recomputation and backward is a phase of its own."""
    import torch

    trace, bench = script("bench/memory_trace.py"), script("bench/memory.py")
    phases = trace.trace("tiny", 2, "baseline", 256)
    names = [phase for phase, _, _ in phases]
    assert {"backward model.layers.0", "backward model.layers.1", "forward model.layers.0"} <= set(names)
    assert names.index("backward model.layers.1") < names.index("backward model.layers.0")  # backward runs in reverse
    cfg = bench.BenchConfig(models=["tiny"], layers=[2], contexts=[256], variants=["baseline"], steps=1)
    cpu, bf16, variant = torch.device("cpu"), torch.bfloat16, bench.VARIANTS["baseline"]
    model = bench.prepare(bench.build_nf4(bench.model_config("tiny", 2), cpu, bf16), variant, 256, cfg, bf16)
    peaks = []
    bench.train_steps(
        model, variant, 256, cfg, cpu, bf16, measure_cpu=lambda *a: peaks.append(bench.tracked_peak(*a)) or 0
    )
    assert max(live for _, live, _ in phases) == peaks[0] > 0
