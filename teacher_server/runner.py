"""Runs one batch through a teacher on its device. Only the batcher thread calls it."""

from __future__ import annotations

import torch

from teacher_server.loading import Teacher

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelRunner:
    """``runner(x_cpu) -> logits_cpu_float32``; device copies and autocast inside."""

    def __init__(self, teacher: Teacher, amp: str = "fp32") -> None:
        if amp not in AMP_DTYPES:
            raise ValueError(f"unknown amp dtype {amp!r}; choose from {', '.join(AMP_DTYPES)}")
        self.teacher = teacher
        self.amp_dtype = AMP_DTYPES[amp]
        self._cuda = teacher.device.type == "cuda"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dev = self.teacher.device
        if self._cuda:
            x = x.pin_memory().to(dev, non_blocking=True)
        else:
            x = x.to(dev)
        with (
            torch.inference_mode(),
            torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None),
        ):
            out = self.teacher.model(x)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        return logits.float().cpu()
