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


def offload_context(model, threshold_bytes: int | None, *, pin_memory: bool = True, use_streams: bool = True):
    """TRL's activation-offloading context for `model`, with our size threshold; a null context when
    `threshold_bytes` is None or there is no accelerator to offload from (on a CPU everything is in host memory).

    TRL's own `activation_offloading=True` offloads every tensor over 1 KiB whatever the sequence length; we build
    the same manager with `min_offload_size` set, which is the only reason this function exists.
    """
    if threshold_bytes is None:
        return contextlib.nullcontext()
    accel = getattr(torch, "accelerator", None)
    current = accel.current_accelerator() if accel is not None else None
    if current is None:
        logger.info("activation offloading: no accelerator here, nothing to offload")
        return contextlib.nullcontext()
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    manager = get_act_offloading_ctx_manager(model, use_pin_memory=pin_memory, use_streams=use_streams,
                                             min_offload_size=int(threshold_bytes), warn_if_no_head=False)
    _keep_loss_on_device(model)
    return manager


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

    hf._longqlora_loss_on_device = (norm.register_forward_pre_hook(enter),
                                    hf.register_forward_hook(leave, always_call=True))


def _identity(tensor):
    return tensor


def offloaded_bytes(manager) -> int:
    """Bytes currently held in host memory by an offloading context (after a forward, before its backward)."""
    tracker = getattr(manager, "tracker", {})
    return sum(t.numel() * t.element_size() for t, moved, *_ in tracker.values() if moved)


# --------------------------------------------------------------------------------------------------- the loss
def plain_causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """The loss from the full logits, as a model without TRL's fused head computes it: (tokens x vocab) logits,
    upcast to fp32. Only for `--chunked_loss false` (comparison and debugging); TRL's fused head is the default."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = outputs.logits
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)


# ------------------------------------------------------------------------------------------------- tiled MLP
def tiled_mlp_active(mode: str, tokens: int, min_tokens: int) -> bool:
    """Whether the MLPs run in sequence tiles for batches of `tokens` tokens."""
    if mode not in TILED_MLP_MODES:
        raise ValueError(f"--tiled_mlp {mode!r}: use one of {', '.join(TILED_MLP_MODES)}")
    return mode == "on" or (mode == "auto" and tokens >= min_tokens)


class _TiledMLPFunction(torch.autograd.Function):
    """y = mlp(x) computed `tile` tokens at a time; only x is saved. The backward recomputes each tile with
    gradients and back-propagates it at once, so the (tokens x intermediate) tensors of the gate, up and down
    projections exist for one tile at a time (the trick of DeepSpeed ALST's TiledMLP, arXiv 2506.13996 §3.2).
    Parameter gradients accumulate in `.grad` inside the backward; RNG and autocast state are replayed so dropout
    masks and precision match the forward."""

    @staticmethod
    def forward(ctx, x, run, tile, *params):
        ctx.run, ctx.tile = run, tile
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
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad(), \
                torch.autocast(device.type, **ctx.autocast), no_offload:
            _set_rng_state(device, ctx.rng)
            start = 0
            for piece, grad in zip(x.split(ctx.tile, dim=-2), grad_out.split(ctx.tile, dim=-2)):
                piece = piece.detach().requires_grad_(want_x)
                torch.autograd.backward(ctx.run(piece), grad)  # parameter gradients land in .grad here
                if want_x:
                    grad_x.narrow(-2, start, piece.shape[-2]).copy_(piece.grad)
                start += piece.shape[-2]
        return (grad_x, None, None) + (None,) * (len(ctx.needs_input_grad) - 3)


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


def enable_tiled_mlp(model, tile_tokens: int, min_tokens: int = 0) -> int:
    """Run every decoder layer's MLP in tiles of `tile_tokens` tokens when a batch holds at least `min_tokens`
    tokens (shorter ones run the MLP as before). Replaces the forward of the MLP *instances* (the same route as
    TRL's fused LM head), so weight names, PEFT and saving are unchanged. Returns the number of MLPs switched."""
    if tile_tokens < 1:
        raise ValueError(f"--tiled_mlp_tokens {tile_tokens}: must be a positive number of tokens, e.g. 8192")
    count = 0
    for name, module in model.named_modules():
        if not name.endswith(".mlp") or hasattr(module, "_longqlora_untiled_forward"):
            continue
        original = module.forward
        module._longqlora_untiled_forward = original

        def tiled_forward(self, x, _run=original):
            if not torch.is_grad_enabled() or x.numel() // x.shape[-1] < min_tokens or x.shape[-2] <= tile_tokens:
                return _run(x)
            params = tuple(p for p in self.parameters() if p.requires_grad)
            return _TiledMLPFunction.apply(x, _run, tile_tokens, *params)

        module.forward = types.MethodType(tiled_forward, module)
        count += 1
    return count


def disable_tiled_mlp(model) -> None:
    """Undo `enable_tiled_mlp`."""
    for module in model.modules():
        original = module.__dict__.pop("_longqlora_untiled_forward", None)
        if original is not None:
            module.__dict__.pop("forward", None)
