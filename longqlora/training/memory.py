"""Long-context memory switches for training: offloaded checkpoints, the chunked loss and sequence-tiled MLPs.

Where a library already does the job we use it: activation offloading is TRL's `OffloadActivations` (pinned host
buffers, a side CUDA stream overlapping the copies with compute), and the chunked loss is TRL's fused LM head
(log-probabilities in tiles, never the (tokens x vocab) logits). What is ours: the per-tensor size threshold that
makes offloading fall back to plain checkpointing for short sequences, the switch back to the plain loss (for
comparison), and the tiled MLP (neither transformers, PEFT nor TRL has one).
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("auto", "on", "off")
TILED_MLP_MODES = ("auto", "on", "off")


# ------------------------------------------------------------------------------------------ offloaded checkpoints
def offload_threshold_bytes(mode: str, min_tokens: int, hidden_size: int, element_bytes: int) -> int | None:
    """The smallest saved tensor that is moved to host memory, or None when offloading is off.

    "auto" offloads tensors at least as large as one `min_tokens`-token slice of the residual stream, so the
    checkpointed hidden states of short batches stay on the GPU (plain checkpointing); "on" offloads every saved
    tensor over 1 KiB (TRL's default).
    """
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"--offload_activations {mode!r}: use one of {', '.join(OFFLOAD_MODES)}")
    if mode == "off":
        return None
    if mode == "on":
        return 1024
    return int(min_tokens) * int(hidden_size) * int(element_bytes)


def offload_context(
    model, threshold_bytes: int | None, *, layers: int | None = None, pin_memory=True, use_streams=True
):
    """TRL's activation-offloading context for `model`, with our size threshold; a null context when
    `threshold_bytes` is None or there is no accelerator to offload from (on a CPU everything is in host memory).

    TRL's own `activation_offloading=True` offloads every tensor over 1 KiB whatever the sequence length; we build
    the same manager with `min_offload_size` set, and with `layers` (--offload_layers) only the first `layers`
    decoder layers' checkpoints go to the host: where the host, not the GPU, is short, the rest stay on the GPU.
    """
    if threshold_bytes is None:
        return contextlib.nullcontext()
    accel = getattr(torch, "accelerator", None)
    current = accel.current_accelerator() if accel is not None else None
    if current is None:
        logger.info("activation offloading: no accelerator here, nothing to offload")
        return contextlib.nullcontext()
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    manager = get_act_offloading_ctx_manager(
        model,
        use_pin_memory=pin_memory,
        use_streams=use_streams,
        min_offload_size=int(threshold_bytes),
        warn_if_no_head=False,
    )
    _keep_loss_on_device(model)
    _offload_first_layers(model, manager, int(threshold_bytes), layers)
    return manager


def _offload_first_layers(model, manager, threshold: int, layers: int | None) -> None:
    """Offload only what is saved before decoder layer `layers` runs (the input ids and the first `layers` layers'
    checkpointed inputs); from there on, nothing. The switch sits in the previous layer's forward hook, which runs
    before the next layer's input is saved whether the checkpoint wraps the layer's call (before its hooks) or, as
    in transformers 5, its forward (after its pre-hook); the model's pre-hook resets the threshold each forward."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    for handle in hf.__dict__.pop("_longqlora_offload_split", ()):
        handle.remove()
    decoder = getattr(hf, "base_model", hf)
    blocks = getattr(decoder, "layers", None)
    if layers is None or blocks is None or layers >= len(blocks):
        if layers is not None and blocks is None:
            logger.warning("--offload_layers %d: %s has no .layers; every checkpoint is offloaded", layers, type(hf))
        return

    def set_minimum(value):  # TRL keeps every tensor under its minimum size on the device
        return lambda *args: setattr(manager, "min_tensor_size_bytes", value)

    keep = set_minimum(float("inf"))
    hooks = [decoder.register_forward_pre_hook(keep if layers == 0 else set_minimum(threshold))]
    if layers > 0:
        hooks.append(blocks[layers - 1].register_forward_hook(keep))
    hf._longqlora_offload_split = tuple(hooks)


def _keep_loss_on_device(model) -> None:
    """Nothing saved from the final norm to the end of the forward is offloaded: TRL's fused LM head reads
    `lm_head.weight` without calling the head, so TRL's no-offload hooks on the head never fire and the final hidden
    states (tokens x hidden, saved by the chunked loss) would go to the host and straight back for the first step of
    the backward."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    norm = getattr(getattr(hf, "base_model", None), "norm", None)
    if norm is None or "_longqlora_loss_on_device" in hf.__dict__:
        return
    region = torch.autograd.graph.saved_tensors_hooks(_identity, _identity)  # innermost hooks win
    entered = []

    def enter(*args):
        if not entered:
            region.__enter__()
            entered.append(True)

    def leave(*args):
        if entered:
            entered.clear()
            region.__exit__(None, None, None)

    hf._longqlora_loss_on_device = (
        norm.register_forward_pre_hook(enter),
        hf.register_forward_hook(leave, always_call=True),
    )


def _identity(tensor):
    return tensor


def offloaded_bytes(manager) -> int:
    """Bytes currently held in host memory by an offloading context (after a forward, before its backward)."""
    tracker = getattr(manager, "tracker", {})
    return sum(t.numel() * t.element_size() for t, moved, *_ in tracker.values() if moved)


# --------------------------------------------------------------------------------------------------- the loss
def trainer_class(chunked_loss: bool):
    """TRL's SFTTrainer (its fused, chunked LM head: the default), or for `--chunked_loss false` (comparison and
    debugging) one whose loss is the model's own, from the full (tokens x vocab) logits upcast to fp32.

    A subclass overriding `compute_loss`, TRL's documented way: its `compute_loss_func` argument (deprecated in TRL
    1.16) runs a second, no-grad forward every step for its metrics. This path logs no entropy or token accuracy."""
    from transformers import Trainer
    from trl import SFTTrainer

    if chunked_loss:
        return SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return PlainLossSFTTrainer


# ------------------------------------------------------------------------------------------------- tiled MLP
def tiled_mlp_active(mode: str, tokens: int, min_tokens: int) -> bool:
    """Whether the MLPs run in sequence tiles for batches of `tokens` tokens."""
    if mode not in TILED_MLP_MODES:
        raise ValueError(f"--tiled_mlp {mode!r}: use one of {', '.join(TILED_MLP_MODES)}")
    return mode == "on" or (mode == "auto" and tokens >= min_tokens)


class _Recomputed(torch.autograd.Function):
    """y = run(x) for a token-wise `run` (an MLP, a norm, LoRA's dropout and A), computed `tile` tokens at a time
    with only x saved. The backward recomputes each tile with gradients and back-propagates it at once, so what
    `run` would have saved (the MLP's tokens x intermediate tensors, a norm's fp32 copies, a dropout mask and the
    dropped copy) exists for one tile at a time, in the backward only (the trick of DeepSpeed ALST's TiledMLP,
    arXiv 2506.13996 §3.2). Parameter gradients are summed over the tiles and returned to the outer backward (not
    accumulated into `.grad` from inside it: DDP and FSDP count one gradient per parameter); RNG and autocast state
    are replayed so dropout masks and precision match the forward."""

    @staticmethod
    def forward(ctx, x, run, tile, *params):
        ctx.run, ctx.tile, ctx.params = run, tile, params
        ctx.autocast = _autocast_state(x.device.type)
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([run(piece) for piece in x.split(tile, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        want_x = ctx.needs_input_grad[0]
        grad_x = torch.empty_like(x) if want_x else None
        device = x.device
        # Identity saved-tensor hooks: what a tile's recomputation saves is used at once, so an outer offloading
        # context (its hooks follow the autograd thread into this backward) must not send it to the host.
        no_offload = torch.autograd.graph.saved_tensors_hooks(_identity, _identity)
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.enable_grad(),
            torch.autocast(device.type, **ctx.autocast),
            no_offload,
        ):
            _set_rng_state(device, ctx.rng)
            wanted = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:]) if need]
            grad_params = [None] * len(wanted)
            start = 0
            for piece, grad in zip(x.split(ctx.tile, dim=-2), grad_out.split(ctx.tile, dim=-2)):
                piece = piece.detach().requires_grad_(want_x)
                got = torch.autograd.grad(ctx.run(piece), ([piece] if want_x else []) + wanted, grad, allow_unused=True)
                if want_x:
                    grad_x.narrow(-2, start, piece.shape[-2]).copy_(got[0])
                    got = got[1:]
                grad_params = [g if acc is None else acc if g is None else acc + g for acc, g in zip(grad_params, got)]
                start += piece.shape[-2]
        returned = iter(grad_params)
        by_param = [next(returned) if need else None for need in ctx.needs_input_grad[3:]]
        return (grad_x, None, None, *by_param)


def _autocast_state(device_type: str) -> dict:
    if not torch.is_autocast_enabled(device_type):
        return {"enabled": False}
    return {"enabled": True, "dtype": torch.get_autocast_dtype(device_type)}


def _rng_state(device):
    cpu = torch.get_rng_state()
    return (cpu, torch.cuda.get_rng_state(device)) if device.type == "cuda" else (cpu, None)


def _set_rng_state(device, state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _recompute_forward(
    module, run, tile_tokens: int, min_tokens: int = 0, min_length: int = 0, marker: str = "_longqlora_recomputed"
):
    """Make `module`'s forward `run` through _Recomputed when gradients flow, the batch holds at least `min_tokens`
    tokens and its rows are longer than `min_length` (the instance's forward is replaced, as TRL does for its fused
    LM head: weight names, PEFT and saving are unchanged). False when it already was."""
    if marker in module.__dict__:
        return False
    module.__dict__[marker] = module.forward

    def forward(self, x, *args, **kwargs):
        params = tuple(p for p in self.parameters() if p.requires_grad)
        if (
            args
            or kwargs
            or not torch.is_grad_enabled()
            or not (x.requires_grad or params)
            or x.numel() // x.shape[-1] < min_tokens
            or x.shape[-2] <= min_length
        ):
            return run(x, *args, **kwargs)
        return _Recomputed.apply(x, run, tile_tokens, *params)

    module.forward = types.MethodType(forward, module)
    return True


def recompute_norms(model, tile_tokens: int = 16384) -> int:
    """Every RMSNorm saves only its input for the backward (and recomputes itself there, in tiles): Llama's RMSNorm
    otherwise keeps an fp32 copy of its input (and, when it trains, its 16-bit normalised output), 6 bytes per
    hidden value twice per layer, more than the checkpoint itself. Returns the number of norms switched."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            count += _recompute_forward(module, module.forward, tile_tokens)
    return count


def recompute_lora_dropout(model) -> int:
    """LoRA's dropout and A run as one function that saves only the (shared) input and redraws the dropout mask in
    the backward: PEFT otherwise keeps, for every adapted projection, the dropped copy of the input (and its mask),
    three of them for q/k/v alone where the input itself is saved once. Returns the number of adapters switched."""
    import torch.nn as nn

    count = 0
    for module in model.modules():
        drops, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if (
            not isinstance(drops, nn.ModuleDict)
            or not isinstance(lora_a, nn.ModuleDict)
            or getattr(module, "lora_variant", None)
        ):  # DoRA and the like use the dropped input elsewhere too
            continue
        for name, drop in drops.items():
            if (
                not isinstance(drop, nn.Dropout)
                or drop.p == 0
                or name not in lora_a
                or "_longqlora_recomputed" in lora_a[name].__dict__
            ):
                continue
            a = lora_a[name]

            def run(x, _drop=drop.forward, _a=a.forward):
                return _a(_drop(x))

            _recompute_forward(a, run, tile_tokens=1 << 62)
            drop.forward = types.MethodType(lambda self, x: x, drop)  # the dropout now happens inside A
            drop.__dict__["_longqlora_recomputed"] = True
            count += 1
    return count


def enable_tiled_mlp(model, tile_tokens: int, min_tokens: int = 0) -> int:
    """Run every decoder layer's MLP in tiles of `tile_tokens` tokens when a batch holds at least `min_tokens`
    tokens (shorter ones run the MLP as before). Returns the number of MLPs switched."""
    if tile_tokens < 1:
        raise ValueError(f"--tiled_mlp_tokens {tile_tokens}: must be a positive number of tokens, e.g. 8192")
    count = 0
    for name, module in model.named_modules():
        if name.endswith(".mlp"):  # rows of one tile or less run the plain MLP: tiling them saves nothing
            count += _recompute_forward(
                module,
                module.forward,
                tile_tokens,
                min_tokens,
                min_length=tile_tokens,
                marker="_longqlora_untiled_forward",
            )
    return count


def disable_recompute(model) -> None:
    """Undo `enable_tiled_mlp`, `recompute_norms` and `recompute_lora_dropout`."""
    for module in model.modules():
        for marker in ("_longqlora_untiled_forward", "_longqlora_recomputed"):
            saved = module.__dict__.pop(marker, None)
            if saved is None:
                continue
            if getattr(saved, "__func__", None) is getattr(type(module), "forward", None) or not callable(saved):
                module.__dict__.pop("forward", None)  # the class's forward again
            else:
                module.forward = saved  # a forward of the instance's own from before (another hook's), kept


# ------------------------------------------------------------------------------------------ a run's switches
def apply_memory_switches(trainer, training, compute_dtype: torch.dtype) -> None:
    """Switch on, for this trainer's model, what --offload_activations, --tiled_mlp, --recompute_norms and
    --recompute_lora_dropout ask for."""
    model = trainer.model
    hidden = model.config.get_text_config().hidden_size
    threshold = offload_threshold_bytes(
        training.offload_activations, training.offload_min_tokens, hidden, compute_dtype.itemsize
    )
    # TRL builds its offloading context only from its own boolean flag; ours carries the size threshold.
    trainer.maybe_activation_offload_context = offload_context(model, threshold, layers=training.offload_layers)
    tiled = 0
    if training.tiled_mlp != "off":
        tiled = enable_tiled_mlp(model, training.tiled_mlp_tokens, training.tiled_mlp_min_tokens)
    norms = recompute_norms(model, training.tiled_mlp_tokens) if training.recompute_norms else 0
    dropouts = recompute_lora_dropout(model) if training.recompute_lora_dropout else 0
    logger.info(
        "memory switches: offload %s (tensors >= %s bytes, layers %s), chunked loss %s, tiled MLP %s in %d layers, "
        "%d norms and %d LoRA dropouts recomputed",
        training.offload_activations,
        threshold,
        "all" if training.offload_layers is None else f"first {training.offload_layers}",
        training.chunked_loss,
        training.tiled_mlp,
        tiled,
        norms,
        dropouts,
    )
