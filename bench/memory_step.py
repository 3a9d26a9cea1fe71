"""bench/memory.py's model and step: a preset's shape with random NF4 weights, prepared as ours (the toolkit's
adaptation and memory switches) or as plain QLoRA, and the measured training steps (CPU peak: the tensors the step's
ops made, tracked by storage, plus what was resident before the step)."""

from __future__ import annotations

import time

import torch

from longqlora.presets import preset_or_local_config
from longqlora.training import memory


# ------------------------------------------------------------------------------------------------- the model
def model_config(name: str, layers: int | None = None):
    if name == "tiny":
        from longqlora.training.tiny import tiny_llama_config

        config = tiny_llama_config("gqa", vocab_size=512, max_position_embeddings=8192)
    else:
        config = preset_or_local_config(name)
    if layers:
        config.num_hidden_layers = layers
    return config


def build_nf4(config, device: torch.device, dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8):
    """The model with random weights, every decoder Linear quantised to NF4 (double quant) one at a time, marked as
    loaded in 4 bit so that PEFT gives it its 4-bit LoRA layers, as `from_pretrained` would (`quant_storage`: the
    dtype the packed codes are stored in, the compute dtype under FSDP2 as the toolkit loads them there)."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(0)
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            weight = torch.randn(child.out_features, child.in_features, generator=gen, device=device, dtype=dtype)
            new = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=False,
                compute_dtype=dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            new.weight = bnb.nn.Params4bit(
                weight.mul_(0.02),
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
                quant_storage=quant_storage,
                module=new,  # the layer keeps the scales too: FSDP2 hands it an unsharded plain tensor
            ).to(device)
            setattr(parent, name, new)
            del weight
    for module in model.modules():  # embeddings, norms, lm_head: still on the meta device
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
            for p in module.parameters(recurse=False):
                torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT dispatches its bnb 4-bit LoRA layers on it
    model.config.use_cache = False
    return model


def prepare(model, variant, context: int, cfg, dtype: torch.dtype, context_parallel=None, group_ratio: float = 0.25):
    """Ours through the toolkit's adaptation and switches (S2-Attn groups of `group_ratio` x `context`, context
    parallel over `context_parallel`, a CPGroup, when given); the baseline as QLoRA users set it up."""
    from longqlora.adapters import adapt_for_training, add_adapters
    from longqlora.model import ModelConfig

    mcfg = ModelConfig(
        model_name_or_path="bench",
        target_context=context,
        lora_r=cfg.rank,
        lora_alpha=2 * cfg.rank,
        lora_dropout=cfg.lora_dropout,
        trainable_params="embed,norm" if variant.lora_plus else "",
        s2_attention=variant.ours and variant.s2,
        s2_group_schedule="none",
        group_ratio=group_ratio,
    )
    if variant.ours:
        model, _ = adapt_for_training(model, mcfg, dtype, context_parallel=context_parallel)
        if variant.recompute_norms:
            memory.recompute_norms(model)
        if variant.recompute_dropout:
            memory.recompute_lora_dropout(model)
        if variant.tiled_mlp != "off":
            memory.enable_tiled_mlp(
                model, cfg.tiled_mlp_tokens, 0 if variant.tiled_mlp == "on" else 4 * cfg.tiled_mlp_tokens
            )
    else:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model, _ = add_adapters(model, mcfg)
    return model


def optimizer_for(params, name: str):
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


# -------------------------------------------------------------------------------------------------- the steps
def batch(vocab: int, context: int, rows: str, device):
    ids = torch.randint(3, vocab, (1, context), device=device)
    if rows == "plain":
        return {"input_ids": ids, "labels": ids}
    cut = [context // 4] * 3 + [context - 3 * (context // 4)]
    pos = torch.cat([torch.arange(n, device=device) for n in cut]).unsqueeze(0)
    return {"input_ids": ids, "labels": ids, "position_ids": pos}


def train_steps(model, variant, context: int, cfg, device, dtype, measure_cpu=None, inputs=None, wrap=None) -> dict:
    """Optimizer state first (one zero-gradient step), then `cfg.steps` measured steps on random tokens (or on
    `inputs`: a context-parallel rank's chunk). `wrap(model)` returns the model wrapped (bench/cp_memory.py's DDP)
    and the bytes the wrap left allocated, which are resident during the step."""
    from trl.trainer.utils import add_fused_lm_head

    if variant.ours:
        add_fused_lm_head(model.get_base_model())
    hidden = model.config.get_text_config().hidden_size
    threshold = memory.offload_threshold_bytes(variant.offload if variant.ours else "off", 8192, hidden, dtype.itemsize)
    offload = memory.offload_context(model, threshold, layers=cfg.offload_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_for(params, variant.optim)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    inputs = inputs or batch(model.config.vocab_size, context, cfg.rows, device)
    wrapped_bytes = 0
    if wrap is not None:
        model, wrapped_bytes = wrap(model)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    model.train()
    times, losses = [], []

    def one_step():
        start = time.perf_counter()
        with offload, autocast:
            out = model(**inputs, **({"fused_lm_head": True} if variant.ours else {}))
            loss = out.loss
            del out  # the baseline's logits must not outlive the step
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())

    if device.type == "cpu" and dtype != torch.float32:
        # PEFT's LoRA layers ask torch.is_autocast_enabled(), which means CUDA's autocast: under the CPU's they cast
        # every LoRA input to fp32 (a 4-byte copy per adapted projection that a GPU step never makes). Raising that
        # flag for the whole step, backward and recomputation included, makes the CPU step take the GPU's branch.
        torch.set_autocast_enabled("cuda", True)
    try:
        cpu_peak = measured_steps(
            one_step,
            cfg.steps,
            measure_cpu
            and (lambda run: resident_bytes(model, optimizer) + wrapped_bytes + measure_cpu(run, model, optimizer)),
        )
    finally:
        torch.set_autocast_enabled("cuda", False)
    timed = times[1:] or times  # the first step warms up (and on a CPU runs under the tracker)
    return {
        "tokens_per_s": context / (sum(timed) / len(timed)),
        "loss": losses[-1],
        "cpu_peak": cpu_peak,
        "timed_steps": len(times) - 1 if measure_cpu or len(times) > 1 else 1,
    }


def measured_steps(one_step, steps: int, measure_cpu) -> int | None:
    """The first step under `measure_cpu` (its peak) when given, the others plain; returns that peak."""
    cpu_peak = None
    if measure_cpu is not None:  # the first step tracked (its memory), the others timed without it
        cpu_peak = measure_cpu(one_step)
    else:
        one_step()
    for _ in range(steps - 1):
        one_step()
    return cpu_peak


def resident_bytes(model, optimizer) -> int:
    """Bytes of every tensor alive before the step: parameters, buffers, NF4 scales, optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():  # bitsandbytes keeps the NF4 scales outside the parameter
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [
                t
                for t in (
                    state.absmax,
                    state.code,
                    getattr(state.state2, "absmax", None),
                    getattr(state.state2, "code", None),
                )
                if t is not None
            ]
    for state in optimizer.state.values():
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def tracked_live(run, *known, observe=None) -> tuple[int, int]:
    """(the highest, the last) total of CPU tensor bytes alive above the start while `run()` runs, counted by torch's
    MemTracker: a dispatch mode holding a weak reference to every storage an op returns, subtracted when the storage
    dies; `known` (the model, the optimizer) registered first, and an op's output on one of its inputs' storages never
    booked, so that updating a tensor made before the step is not counted as new memory. Not the profiler: it books
    the frees made inside an autograd Function (TRL's fused loss, the optimizer's step) to the Function's event at its
    start, before the allocations they free; read in order, its events hid up to 3.9 GiB of a 4k-token step.
    `observe(bytes, op, module, backward)`, when given, sees the live total above the start after every op, with the
    innermost module running it and whether it runs in the backward (bench/memory_trace.py)."""
    from torch.distributed._tools.common_utils import get_untyped_storages
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils._pytree import tree_leaves

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # its gradient hooks only sort gradients into their own category, and fail on frozen parameters
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # an op's output on an input's storage (in place, out=, a view) is no new memory: without this, a
            # tensor made before the step and not known here (DDP's buckets, say) would be booked when updated
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self._op_inputs = {st.data_ptr() for t in inputs for st in get_untyped_storages(t)}
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if observe is not None:
                module = max(self._mod_tracker.parents, key=len, default="")
                observe(total(self._curr_mem_snap) - start, str(func), module, self._mod_tracker.is_bw)
            return out

        def _track(self, reftype, t):
            if not any(st.data_ptr() in self._op_inputs for st in get_untyped_storages(t)):
                super()._track(reftype, t)

    cpu = torch.device("cpu")
    total = lambda snapshot: snapshot.get(cpu, {}).get("Total", 0)  # noqa: E731
    tracker = Tracker()
    tracker.track_external(*known)
    start = total(tracker.get_tracker_snapshot())
    with tracker:
        run()
        left = total(tracker.get_tracker_snapshot())
    return total(tracker.get_tracker_snapshot("peak")) - start, left - start


def tracked_peak(run, *known) -> int:
    """The highest total of live CPU tensor bytes above the start while `run()` runs."""
    return tracked_live(run, *known)[0]
