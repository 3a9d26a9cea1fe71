"""What this machine can do: GPU generation, bf16, which optional kernels import, and how its processes were
launched.

GPU-only packages (flash-attn, xformers, bitsandbytes) are imported lazily and only once, so `import longqlora`
works on a CPU-only machine; every check here is cached.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flash_attn", "xformers")
# The one table of dtype names every flag takes (--compute_dtype, merge --dtype, the planner's byte sizes).
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@functools.cache
def _import(name: str):
    """The module, or None when it is missing or fails to import (a broken CUDA build counts as missing)."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # ImportError, or a CUDA library error raised at import time
        logger.debug("optional package %s unavailable: %s", name, err)
        return None


@functools.cache
def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) of the CUDA device, or None without one (cached: S2-Attn asks in every layer)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def supports_bf16() -> bool:
    """bf16 needs Ampere (sm_80) or newer on CUDA; the CPU computes it everywhere (slowly)."""
    cap = cuda_capability()
    return cap is None or cap >= (8, 0)


def default_compute_dtype() -> torch.dtype:
    """bf16 on Ampere+, fp16 on Volta/Turing (a V100 has no bf16), fp32 on CPU (bitsandbytes' CPU 4-bit path
    runs about 4x faster in fp32 than in bf16)."""
    cap = cuda_capability()
    if cap is None:
        return torch.float32
    return torch.bfloat16 if cap >= (8, 0) else torch.float16


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a --compute_dtype / --dtype name; auto is `default_compute_dtype()`."""
    return default_compute_dtype() if name == "auto" else DTYPES[name]


def flash_attn_module():
    """The flash_attn package if it imports and the GPU is Ampere or newer, else None."""
    cap = cuda_capability()
    if cap is None or cap < (8, 0):
        return None
    return _import("flash_attn")


def xformers_ops():
    """xformers.ops if it imports and a CUDA GPU is present (it runs on a V100), else None."""
    if cuda_capability() is None:
        return None
    return _import("xformers.ops")


def backend_problem(backend: str) -> str | None:
    """Why `backend` cannot run here (one line naming the fix), or None when it can."""
    if backend not in BACKENDS:
        return f"--attn_backend must be one of {', '.join(BACKENDS)} or auto, got {backend!r}"
    if backend == "sdpa":
        return None
    cap = cuda_capability()
    if cap is None:
        return f"--attn_backend {backend} needs a CUDA GPU; use --attn_backend sdpa (or auto) on this machine"
    if backend == "flash_attn":
        if cap < (8, 0):
            return (
                f"--attn_backend flash_attn needs an Ampere or newer GPU (this one is sm_{cap[0]}{cap[1]}); "
                "use xformers or sdpa"
            )
        if _import("flash_attn") is None:
            return (
                "--attn_backend flash_attn: flash-attn is not installed; `pip install flash-attn "
                "--no-build-isolation` or use sdpa"
            )
    if backend == "xformers" and _import("xformers.ops") is None:
        return (
            "--attn_backend xformers: xformers is not installed; install the xformers wheel made for your torch, or "
            "use sdpa"
        )
    return None


@functools.cache
def torch_varlen() -> dict | None:
    """PyTorch's own varlen flash-attention (`torch.nn.attention.varlen.varlen_attn`, torch 2.9+) where it runs: a
    CUDA GPU of sm_80 or newer (it calls aten's flash kernel). Returns {"fn", "causal", "scale", "enable_gqa"}: the
    function and how this torch version spells causality (`is_causal=True`, or `window_size=(-1, 0)` in newer
    releases) and whether it takes a softmax scale and GQA; None where it does not run."""
    import inspect

    cap = cuda_capability()
    module = _import("torch.nn.attention.varlen") if cap is not None and cap >= (8, 0) else None
    fn = getattr(module, "varlen_attn", None)
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    causal = "is_causal" if "is_causal" in params else "window_size" if "window_size" in params else None
    if causal is None:
        return None
    return {"fn": fn, "causal": causal, "scale": "scale" in params, "enable_gqa": "enable_gqa" in params}


def call_torch_varlen(q, k, v, cu_seqlens, max_len: int, *, scale, gqa: bool):
    """Causal `varlen_attn` over (tokens, heads, D) streams with the same cu_seqlens for queries and keys."""
    features = torch_varlen()
    kwargs = {"is_causal": True} if features["causal"] == "is_causal" else {"window_size": (-1, 0)}
    if features["scale"]:
        kwargs["scale"] = scale
    if gqa:
        kwargs["enable_gqa"] = True
    return features["fn"](q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)


def sdpa_gqa_ok(device: torch.device | str, dtype: torch.dtype | None = None) -> bool:
    """Whether SDPA should broadcast GQA key/value heads itself (`enable_gqa`) rather than get them repeated: on the
    CPU and where its flash kernel runs (sm_80+, 16-bit `dtype`). Elsewhere (an older GPU, fp32) only the
    memory-efficient kernel is left, which does not take enable_gqa in every torch release, so SDPA would fall back
    to the O(N^2) math kernel."""
    if torch.device(device).type != "cuda":
        return True
    cap = cuda_capability()
    return cap is not None and cap >= (8, 0) and dtype in (None, torch.float16, torch.bfloat16)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on `device` (CPU: sdpa only), in the order `auto` prefers them for packed rows."""
    if device is not None and torch.device(device).type != "cuda":
        return ["sdpa"]
    return [b for b in ("flash_attn", "xformers", "sdpa") if backend_problem(b) is None]


def auto_kernels(device: torch.device | str) -> str:
    """What `--attn_backend auto` runs on `device`, for plain rows and for packed or padded rows."""
    if torch.device(device).type != "cuda":
        return "sdpa (packed rows: banded sdpa)"
    packed = (
        "flash_attn varlen"
        if backend_problem("flash_attn") is None
        else "torch varlen"
        if torch_varlen() is not None
        else "xformers varlen"
        if backend_problem("xformers") is None
        else "banded sdpa"
    )
    return f"sdpa (packed rows: {packed})"


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """The kernel family for `backend` on `device`: `auto`/None is "auto" on CUDA (a choice per batch, see
    attention._varlen_kernel and `auto_kernels`) and "sdpa" on the CPU; a forced backend is checked."""
    if backend in (None, "auto"):
        return "auto" if torch.device(device).type == "cuda" else "sdpa"
    problem = backend_problem(backend)
    if problem:
        raise ValueError(problem)
    if backend != "sdpa" and torch.device(device).type != "cuda":
        raise ValueError(f"--attn_backend {backend} runs on CUDA tensors only; these are on {device}")
    return backend


# ------------------------------------------------------------------------------------------------ processes
@dataclass(frozen=True)
class Launch:
    """How this process was started: `engine` is none (one process), ddp, fsdp2, fsdp1 or deepspeed."""

    world_size: int
    rank: int
    local_rank: int
    engine: str
    zero_stage: int | None = None
    whole_state_dict: bool = True  # the engine can gather the whole model for saving (FULL_STATE_DICT, 16-bit save)
    mixed_precision: str = "no"  # what accelerate launch set: no, bf16 or fp16
    zero3_live_values: int = 1_000_000_000  # stage3_max_live_parameters: DeepSpeed's default unless its JSON sets it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shards_weights(self) -> bool:
        """FSDP and ZeRO-3 hold each weight in pieces: NF4 must be stored in the compute dtype to be sharded."""
        return self.engine in ("fsdp2", "fsdp1") or (self.engine == "deepspeed" and self.zero_stage == 3)


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _json_value(value, accelerates):
    """A DeepSpeed JSON value, or accelerate's own setting where the JSON says "auto" or nothing."""
    return accelerates if value is None or str(value).lower() == "auto" else value


def _deepspeed_zero(config_file: str) -> dict:
    """The `zero_optimization` object of the DeepSpeed JSON that accelerate launch was given, read before accelerate
    reads it inside SFTConfig, where a bad file ends in an error naming no file."""
    import json

    where = f"{config_file} (accelerate's deepspeed_config_file)"
    if not os.path.isfile(config_file):
        raise ValueError(
            f"{where}: no such file here; launch from the repository's root (deepspeed_zero3.yaml names its JSON "
            "relative to it) or give the JSON's full path"
        )
    with open(config_file) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON: {e}; fix the file") from None
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    if not isinstance(zero, dict):
        raise ValueError(
            f'{where}: needs a JSON object with a "zero_optimization" object (stage 3), as '
            "configs/accelerate/deepspeed_zero3.json has"
        )
    return zero


def _zero3_live_values(zero: dict, config_file: str) -> int:
    """What DeepSpeed keeps gathered, as the memory plan counts it (plan_sharding.zero3_bytes): the JSON's
    stage3_max_live_parameters (a number, or a string of one, as DeepSpeed reads it), else DeepSpeed's default. The
    plan was measured with stage3_max_reuse_distance equal to it (as DeepSpeed's defaults are); a JSON that sets
    them apart is planned with the live limit, said once."""
    default = Launch.zero3_live_values
    limits = []
    for key in ("stage3_max_live_parameters", "stage3_max_reuse_distance"):
        try:
            limits.append(int(float(zero.get(key, default))))
        except (TypeError, ValueError):  # "auto" or a typo: DeepSpeed itself refuses it when it starts
            limits.append(default)
    live, reuse = limits
    if live < 0:
        raise ValueError(f"{config_file}: stage3_max_live_parameters {live}: must be 0 or more (DeepSpeed's 1e9)")
    if live != reuse:
        _warn_apart(config_file, live, reuse)
    return live


@functools.cache  # launch() is read many times in a run: say it once
def _warn_apart(config_file: str, live: int, reuse: int) -> None:
    logger.warning(
        "%s: stage3_max_live_parameters %d and stage3_max_reuse_distance %d differ; the memory plan counts what "
        "DeepSpeed keeps with both at %d (measured only with them equal)",
        config_file,
        live,
        reuse,
        live,
    )


def launch() -> Launch:
    """This process's launch, read from the environment that torchrun and `accelerate launch` set."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        stage, whole = (
            os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"),
            _flag("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"),
        )
        config_file, live = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"), Launch.zero3_live_values
        if config_file and config_file != "none":  # a DeepSpeed JSON instead of the accelerate keys ("none": not)
            zero = _deepspeed_zero(config_file)
            # "auto" (or absent) takes accelerate's own setting, as accelerate fills it: stage 2 when unset
            stage = _json_value(zero.get("stage"), stage or "2")
            save = _json_value(zero.get("stage3_gather_16bit_weights_on_model_save"), whole)
            whole = str(save).lower() in ("1", "true", "yes")  # "false" is false, as DeepSpeed reads it
            live = _zero3_live_values(zero, config_file)
        stage = int(stage) if stage and str(stage).isdigit() else None
        return Launch(world, rank, local, "deepspeed", stage, whole or stage != 3, precision, live)
    if _flag("ACCELERATE_USE_FSDP"):
        engine = "fsdp2" if os.environ.get("FSDP_VERSION", "1") == "2" else "fsdp1"
        # Unset, accelerate's FullyShardedDataParallelPlugin takes FULL for FSDP1 and SHARDED for FSDP2.
        default = "SHARDED_STATE_DICT" if engine == "fsdp2" else "FULL_STATE_DICT"
        whole = os.environ.get("FSDP_STATE_DICT_TYPE", default).upper() == "FULL_STATE_DICT"
        return Launch(world, rank, local, engine, None, whole, precision)
    return Launch(world, rank, local, "ddp" if world > 1 else "none", mixed_precision=precision)


def device_map(device: str, run: Launch | None = None) -> dict | None:
    """Where this process loads the model: its own GPU (LOCAL_RANK) or the CPU; None under DeepSpeed, which places
    (and with ZeRO-3 partitions) the weights itself."""
    run = run or launch()
    if run.engine == "deepspeed":
        return None
    if device != "cuda":
        return {"": "cpu"}
    return {"": run.local_rank if run.world_size > 1 else torch.cuda.current_device()}
