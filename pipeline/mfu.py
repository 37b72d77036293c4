"""Model FLOPs utilisation: the GPUs' dense peaks, and the FLOPs a training step does.

One table for the trainer (``train/mfu``) and ``bench/tnt_gpu_bench.py``. It is keyed
on the exact names ``torch.cuda.get_device_name()`` reports, because the variants of a
part differ by up to a third (H100 SXM 989 vs PCIe 756 vs NVL 835 dense bf16 TFLOP/s)
and a substring match took "NVIDIA H100 PCIe" for the SXM part. A name that is not in
the table gives no MFU (``train.device_peak_tflops`` sets one) rather than a guess.

Figures: NVIDIA's data sheets, dense (the sheets' headline tensor figures are with
2:4 sparsity, twice these). ``tf32`` is what float32 matmuls run at with TF32 allowed
(the trainer allows it on CUDA), ``fp32`` without.
"""

from __future__ import annotations

# dense TFLOP/s by precision
_H100_SXM = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}
_H100_PCIE = {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}
_NVL = {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}  # H100 NVL and H200 NVL (94/141 GB, PCIe card)
_A100 = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}
_L40S = {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100": _H100_SXM,  # H100 SXM5 on some drivers
    "NVIDIA H100 PCIe": _H100_PCIE,
    "NVIDIA H100 NVL": _NVL,
    "NVIDIA H200": _H100_SXM,  # H200 SXM: the H100 SXM's compute, more memory
    "NVIDIA H200 NVL": _NVL,
    "NVIDIA GH200 480GB": _H100_SXM,
    "NVIDIA GH200 144G HBM3e": _H100_SXM,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA L40S": _L40S,
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` (as torch reports it) in ``precision``
    (bf16, fp16, tf32, fp32); None for a device or precision not in the table."""
    return PEAK_TFLOPS.get(device_name.strip(), {}).get(precision)


def matmul_precision(precision: str, tf32_allowed: bool) -> str:
    """The table's precision key for a training precision (bf16, fp16, fp32)."""
    if precision == "fp32":
        return "tf32" if tf32_allowed else "fp32"
    return precision


def step_flops_per_image(model) -> float:
    """Forward + backward FLOPs per image of ``model(x)`` as training runs it.

    ``model(x)`` with class-token pooling computes only the class token in its last
    block (TNT-S: 4.93 instead of the paper's 5.22 GMACs, ``tnt.count_flops``), so
    this counts that forward, times 3 (the backward pass is about twice the forward).
    """
    from pipeline import tnt

    return 3 * tnt.count_flops(model, as_run=True)["flops"]


def mfu(images_per_s_per_device: float, flops_per_image: float, peak: float | None) -> float | None:
    """Fraction of the device's peak that ``images_per_s`` of ``flops_per_image`` is."""
    if not peak:
        return None
    return images_per_s_per_device * flops_per_image / (peak * 1e12)
