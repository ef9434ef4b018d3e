"""Where and how training runs (torch): the device and its ranks (torchrun + DDP, DataParallel), mixed
precision, every RNG's state, the collectives that keep ranks in step, the loss kept on the device, GPU stats.

Examples:

    import runtime
    place = runtime.setup_runtime("auto", use_multi_gpu=True)   # DDP under torchrun, else one process
    print(place.device, place.world_size, runtime.GPUMonitor(__import__("logging").getLogger()).summary())
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from config import Config
from utils import ConfigError


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Every RNG training touches, as tensors and plain types."""
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                      "has_gauss": int(numpy_state[3]), "gauss": float(numpy_state[4])},
            "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- precision
def amp_settings(config: Config, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, or None for fp32; whether fp16 loss scaling is needed). CUDA: bf16 where supported,
    else fp16. CPU: bf16 only where computed natively (AVX512-BF16 or AMX: 1.5x faster than fp32 there,
    benchmarks/README.md); emulated bf16 is slower than fp32."""
    wanted = config.training.amp_dtype
    if not config.training.mixed_precision:
        return None, False
    if device.type == "cpu":
        native_bf16 = any(getattr(torch.cpu, probe, lambda: False)()
                          for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return (torch.bfloat16 if wanted == "bfloat16" or (wanted == "auto" and native_bf16) else None), False
    if device.type != "cuda":
        return None, False
    if wanted == "bfloat16" or (wanted == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


# ----------------------------------------------------------------------------- distributed
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False
    data_parallel_gpus: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def setup_runtime(device_name: str, use_multi_gpu: bool) -> Runtime:
    """DDP when launched by torchrun (RANK/WORLD_SIZE set), else one process, DataParallel if asked."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        return Runtime(device, rank, local_rank, world_size, distributed=True)
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"training.device is '{device_name}' but no CUDA GPU is available")
    device = torch.device(device_name)
    several = device.type == "cuda" and use_multi_gpu and device.index is None
    gpus = torch.cuda.device_count() if several else 1
    return Runtime(device, data_parallel_gpus=max(gpus, 1))


def leave_group(runtime: Runtime) -> None:
    """Every rank leaves the process group together. A gloo barrier can return on one rank while its last
    message to another is still in flight; tearing the group down then aborts that rank (SIGABRT,
    pytorch/gloo#155). So after the barrier each rank checks in through the rendezvous store, which is not
    gloo, and only when all have checked in does any rank destroy its group."""
    if not runtime.distributed:
        return
    torch.distributed.barrier()
    store = torch.distributed.distributed_c10d._get_default_store()
    store.set(f"deeplog/left/{runtime.rank}", "1")
    store.wait([f"deeplog/left/{rank}" for rank in range(runtime.world_size)])
    torch.distributed.destroy_process_group()


def all_gather(value, runtime: Runtime) -> list:
    """Every rank's value (picklable plain data), in rank order; [value] in a single process."""
    if not runtime.distributed:
        return [value]
    gathered = [None] * runtime.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def any_rank(flag: bool, runtime: Runtime, every_rank: bool = False) -> bool:
    """Whether `flag` holds on any rank (or, with every_rank, on all): one tiny all-reduce under DDP."""
    if not runtime.distributed:
        return flag
    value = torch.tensor([int(flag)], device=runtime.device)
    op = torch.distributed.ReduceOp.MIN if every_rank else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(value, op=op)
    return bool(value.item())


def lockstep(batches, runtime: Runtime):
    """Yield until any rank runs out of batches: a rank that stopped alone would leave the others waiting
    in DDP's gradient all-reduce forever. One tiny all-reduce per step under DDP, nothing otherwise."""
    iterator = iter(batches)
    while True:
        item = next(iterator, None)
        if not any_rank(item is not None, runtime, every_rank=True):
            return
        yield item


def stop_requested(stop, runtime: Runtime, step: int, every: int) -> bool:
    """Whether a stop signal asks training to stop now; under DDP all-reduced every `every` steps."""
    if runtime.distributed and step % every:
        return False
    return any_rank(stop.received is not None, runtime)


def all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    """Sum metrics over ranks (no-op in a single process)."""
    if not runtime.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


class LossWindow:
    """The loss since the last flush, kept on the device (.item() only at log time) in float64, so the
    epoch's sum does not depend on when it is flushed: a resumed run's history is bit-identical."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.tokens = torch.zeros((), device=device, dtype=torch.long)

    def add(self, loss_sum, tokens) -> None:
        self.loss += loss_sum.double()
        self.tokens += tokens

    def flush_into(self, state) -> int:
        """Move the window into the epoch's running sums (of a checkpoint.TrainState); its token count."""
        tokens = int(self.tokens.item())
        state.epoch_loss_sum += self.loss.item()
        state.epoch_tokens += tokens
        self.loss.zero_(), self.tokens.zero_()
        return tokens


# ----------------------------------------------------------------------------- GPU stats
def visible_gpu_indices(count: int) -> list[int]:
    """NVML numbers every GPU of the machine; report only those CUDA_VISIBLE_DEVICES lets this run use."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    parts = [part.strip() for part in visible.split(",") if part.strip()]
    if all(part.isdigit() and int(part) < count for part in parts):
        return [int(part) for part in parts]
    return list(range(count))  # UUIDs or MIG names: no mapping to NVML indices, show them all


class GPUMonitor:
    """Per-GPU memory, utilisation, temperature and power via pynvml; a one-time note when unavailable."""

    def __init__(self, logger: logging.Logger, device_indices: list[int] | None = None):
        self.handles = []
        self.indices = []
        if not torch.cuda.is_available():
            logger.info("GPU stats: no CUDA GPU, running on CPU (no GPU field in step lines)")
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            count = pynvml.nvmlDeviceGetCount()
            self.indices = device_indices if device_indices is not None else visible_gpu_indices(count)
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]
        except Exception as error:  # ImportError, NVMLError (driver missing, no permission, ...): no handles
            logger.info(f"GPU stats: pynvml unavailable ({type(error).__name__}: {error}); "
                        f"install nvidia-ml-py for per-GPU memory/utilisation; no GPU field in step lines")

    def _query(self, handle):
        memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
        utilisation = self.nvml.nvmlDeviceGetUtilizationRates(handle)
        return memory, utilisation

    def summary(self) -> str | None:
        """'GPU: [0:12345MB|95%] [1:...]' or None without pynvml."""
        if not self.handles:
            return None
        try:
            parts = []
            for index, handle in zip(self.indices, self.handles):
                memory, utilisation = self._query(handle)
                parts.append(f"[{index}:{memory.used // 2**20}MB|{utilisation.gpu}%]")
            return "GPU: " + " ".join(parts)
        except Exception:
            return None

    def details(self) -> list[str]:
        lines = []
        for index, handle in zip(self.indices, self.handles):
            try:
                memory, utilisation = self._query(handle)
                temperature = self.nvml.nvmlDeviceGetTemperature(handle, self.nvml.NVML_TEMPERATURE_GPU)
                power = self.nvml.nvmlDeviceGetPowerUsage(handle) / 1000
                lines.append(f"GPU {index}: memory {memory.used // 2**20}/{memory.total // 2**20}MB | "
                             f"util {utilisation.gpu}% | temp {temperature}C | power {power:.0f}W")
            except Exception as error:
                lines.append(f"GPU {index}: stats unavailable ({error})")
        return lines
