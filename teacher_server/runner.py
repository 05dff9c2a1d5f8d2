"""Runs batches through one teacher on its device (the ``BatchRunner`` of the batcher).

``prepare`` (assembler thread on CUDA): pin host memory and start the copy to
the device on a side CUDA stream, so it overlaps the forward in flight.
``forward`` (model thread): wait for that copy, run the model under
inference mode and optional autocast, capture requested layers with forward
hooks. ``to_host`` (completion thread on CUDA): copy outputs back. On CPU
nothing overlaps, so the batcher runs all three on its model thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from kd.core.factory import logits_of
from kd.teacher_server.loading import Teacher

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class _Prepared:
    x: torch.Tensor
    ready: torch.cuda.Event | None


class ModelRunner:
    def __init__(
        self,
        teacher: Teacher,
        amp: str = "fp32",
        *,
        compile: bool = False,
        channels_last: bool = False,
        threads: int = 0,
    ) -> None:
        if amp not in AMP_DTYPES:
            raise ValueError(f"unknown amp dtype {amp!r}; choose from {', '.join(AMP_DTYPES)}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch's default), got {threads}")
        self.threads = threads
        self.teacher = teacher
        self.amp_dtype = AMP_DTYPES[amp]
        self.channels_last = channels_last
        self._cuda = teacher.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(teacher.device) if self._cuda else None
        # The batcher forms one batch ahead only when its copy to the device overlaps the forward.
        self.overlaps_copy = self._cuda
        self._modules = dict(teacher.model.named_modules())
        model = teacher.model
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._model = torch.compile(model) if compile else model

    def on_thread_start(self) -> None:
        """Called by the batcher on its model thread before the first forward: torch's
        intra-op thread count is per thread, so ``torch.set_num_threads`` in the main
        thread does not reliably reach the thread that runs the model."""
        if self.threads:
            torch.set_num_threads(self.threads)

    def prepare(self, x: torch.Tensor) -> _Prepared:
        if not self._cuda:
            return _Prepared(self._layout(x), None)
        with torch.cuda.stream(self._copy_stream):
            x = self._layout(x.pin_memory().to(self.teacher.device, non_blocking=True))
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return _Prepared(x, ready)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def forward(self, prepared: _Prepared, layers: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
        if prepared.ready is not None:
            torch.cuda.current_stream(self.teacher.device).wait_event(prepared.ready)
            prepared.x.record_stream(torch.cuda.current_stream(self.teacher.device))
        captured: dict[str, torch.Tensor] = {}
        handles = []
        owner = threading.get_ident()
        for name in layers:

            def hook(_module, _inputs, output, name=name) -> None:
                if threading.get_ident() != owner:
                    return  # another path (input gradients) running the same module concurrently
                out = output[0] if isinstance(output, (tuple, list)) else output
                # A clone: a later in-place op (ReLU(inplace=True)) must not change it.
                captured[f"feature/{name}"] = out.clone()

            handles.append(self._modules[name].register_forward_hook(hook))
        try:
            with (
                torch.inference_mode(),
                torch.autocast(
                    self.teacher.device.type,
                    dtype=self.amp_dtype or torch.float32,
                    enabled=self.amp_dtype is not None,
                ),
            ):
                out = self._model(prepared.x)
        finally:
            for h in handles:
                h.remove()
        logits = logits_of(out)
        return {"logits": logits.float(), **captured}

    def to_host(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self._cuda:
            return outputs
        return {k: v.to("cpu") for k, v in outputs.items()}

    def __call__(self, x: torch.Tensor, layers: frozenset[str] = frozenset()) -> torch.Tensor:
        """Logits for a CPU batch, synchronously (in-process sources, precompute)."""
        return self.to_host(self.forward(self.prepare(x), layers))["logits"]

    def warmup(self, batch_sizes: list[int]) -> None:
        """Run each batch size once so the first real request pays no start-up cost
        (CUDA context, cuDNN autotuning, torch.compile)."""
        for n in sorted(set(batch_sizes)):
            x = torch.zeros((n, *self.teacher.input_shape), dtype=self.teacher.input_dtype)
            self(x)
