"""Where and in what precision the LLMs run: the device policy, the default dtype, and the attention kernels a
backpropagated forward may use on CUDA."""

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def resolve_device(value=None):
    """'auto'/None -> cuda when available else cpu; an explicit 'cuda' without CUDA is an error."""
    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={value!r} was requested but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use device='auto' or 'cpu'."
        )
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def default_dtype(device, value="auto"):
    """'auto' -> bf16 on CUDA when supported (else fp16), fp32 on CPU; explicit names are honoured."""
    if isinstance(value, torch.dtype):
        return value
    if value is None or value == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if value not in _DTYPES:
        raise ValueError(f"dtype={value!r} is not understood; expected 'auto' or one of {sorted(_DTYPES)}.")
    return _DTYPES[value]


def sdpa_for_backward(device, even_without_grad=False):
    """Context for an LLM forward that will be backpropagated: on CUDA, attention without the cuDNN backend.

    torch >= 2.11 picks cuDNN attention on H100/H200, whose backward returns NaN in grad_q when an attention
    mask is passed and a query row has all its keys masked (pytorch/pytorch#196678). Left padding gives every
    padded position such a row, so Laser's prefix/suffix training and SeRALM's LoRA alignment got NaN on an H200
    (ScaledDotProductCudnnAttentionBackward0). Flash, memory-efficient and math attention are exact there.
    Forward-only passes (item refresh, evaluation, generation) keep the default choice, unless
    ``even_without_grad``: a no-grad pass whose numbers are compared with a backpropagated one (the alignment's
    reference log-probs) should use the same kernels, else the KL starts at bf16 rounding noise instead of 0
    (-1.3e-4 on an H200).
    """
    if torch.device(device).type != "cuda" or not (even_without_grad or torch.is_grad_enabled()):
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
