"""The GPU types a run is planned for: memory, bf16 peak and the bandwidth of the usual AWS instance.

Figures are the vendors' (NVIDIA's A100/H100/H200 datasheets; AWS's p4d/p4de/p5/p5e instance pages), so a
plan can be checked against them: memory as ``nvidia-smi`` reports the board's total, dense bf16 tensor-core
peak without sparsity, NVLink bandwidth per GPU and direction, and the instance's EFA bandwidth per node.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class GpuType:
    key: str
    """What ``--gpu-type`` takes."""
    name: str
    memory_bytes: int
    """The board's memory as nvidia-smi reports it (the CUDA context and NCCL come out of it: see headroom)."""
    bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s (no 2:4 sparsity)."""
    intra_node_bytes_per_s: float
    """NVLink bandwidth per GPU and direction."""
    inter_node_bytes_per_s: float
    """The instance's network (EFA) bandwidth per node and direction, shared by its GPUs."""
    gpus_per_node: int
    instance: str
    """The usual AWS instance, as ``ray_cluster.yaml`` names node types."""

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


GPU_TYPES: dict[str, GpuType] = {
    gpu.key: gpu
    for gpu in [
        # A100 SXM4: 312 TFLOP/s bf16 dense; NVLink 3: 600 GB/s per GPU (both directions); p4d: 4 x 100 Gbit/s EFA.
        GpuType(key="a100-40gb", name="A100 40GB", memory_bytes=40960 * 2**20, bf16_flops=312e12,
                intra_node_bytes_per_s=300e9, inter_node_bytes_per_s=50e9, gpus_per_node=8, instance="p4d.24xlarge"),
        GpuType(key="a100-80gb", name="A100 80GB", memory_bytes=81920 * 2**20, bf16_flops=312e12,
                intra_node_bytes_per_s=300e9, inter_node_bytes_per_s=50e9, gpus_per_node=8, instance="p4de.24xlarge"),
        # H100 SXM5: 989.4 TFLOP/s bf16 dense; NVLink 4: 900 GB/s per GPU (both directions); p5: 3,200 Gbit/s EFA.
        GpuType(key="h100", name="H100 80GB", memory_bytes=81559 * 2**20, bf16_flops=989.4e12,
                intra_node_bytes_per_s=450e9, inter_node_bytes_per_s=400e9, gpus_per_node=8, instance="p5.48xlarge"),
        # H200: the H100's compute and NVLink with 141 GB of HBM3e; p5e: 3,200 Gbit/s EFA.
        GpuType(key="h200", name="H200 141GB", memory_bytes=143771 * 2**20, bf16_flops=989.4e12,
                intra_node_bytes_per_s=450e9, inter_node_bytes_per_s=400e9, gpus_per_node=8, instance="p5e.48xlarge"),
    ]
}

# What a Ray accelerator type or a casual spelling means here.
_ALIASES = {"a100": "a100-40gb", "a100-40": "a100-40gb", "a100-80": "a100-80gb", "h100-80gb": "h100", "h200-141gb": "h200"}


def get_gpu_type(key: str) -> GpuType:
    """The GPU type for ``key`` (case-insensitive; ``a100`` is the 40 GB board); ValueError names the choices."""
    normal = key.strip().lower()
    normal = _ALIASES.get(normal, normal)
    if normal not in GPU_TYPES:
        raise ValueError(f"unknown GPU type {key!r}; allowed: {', '.join(GPU_TYPES)}")
    return GPU_TYPES[normal]
