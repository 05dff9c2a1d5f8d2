"""Runs batches through one teacher on its device (the ``BatchRunner`` of the batcher).

``prepare`` (assembler thread on CUDA): pin host memory and start the copy to
the device on a side CUDA stream, so it overlaps the forward in flight.
``forward`` (model thread): wait for that copy, run the model under
inference mode and optional autocast, capture requested layers with forward
hooks. ``to_host`` (completion thread on CUDA): copy outputs back, after the
batcher has post-processed each request's rows on the device
(``kd.teacher_server.outputs``), into reused page-locked host buffers
(``HostStaging``): an asynchronous DMA copy, and no pinned allocation per reply.
On CPU nothing overlaps and nothing is copied: the batcher runs all three on its
model thread, and the post-processing runs there too, by the same code.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import torch

from kd.core.factory import logits_of
from kd.teacher_server.loading import Teacher

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _storage_uses(t: torch.Tensor) -> int | None:
    """References to ``t``'s storage (tensors and views), None where torch does not tell."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    return int(use_count(t.untyped_storage()._cdata))


class HostStaging:
    """Host buffers for device->host copies, reused once nothing refers to them.

    ``copy_out`` packs a dict of device tensors into one buffer (pinned when
    ``pin``: the copy is an asynchronous DMA, waited for once) and returns views
    of it. A buffer goes back into use only when no tensor or view of it is left
    (torch's storage use count), so a reply still being encoded is never
    overwritten; where torch cannot tell, buffers are not reused. Thread-safe:
    several completion threads (instances) may share one."""

    ALIGN = 64  # bytes: every view starts aligned for its dtype
    MIN_BYTES = 1 << 16

    def __init__(self, pin: bool, max_bytes: int = 256 << 20) -> None:
        self.pin = pin
        self.max_bytes = max_bytes  # kept for reuse, all buffers together; beyond it they are freed after use
        self._buffers: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.allocated = 0  # buffers allocated (a steady load stops allocating)
        self.reused = 0

    def _free(self, buf: torch.Tensor) -> bool:
        # The pool's own tensor plus the temporary storage object of the query: 2 when unused.
        uses = _storage_uses(buf)
        return uses is not None and uses <= 2

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of ``nbytes`` that nothing else uses now (a view, made under the
        lock, so no other thread can take the same buffer before the caller fills it)."""
        with self._lock:
            fitting = [b for b in self._buffers if b.numel() >= nbytes and self._free(b)]
            if fitting:
                self.reused += 1
                return min(fitting, key=lambda b: b.numel())[:nbytes]
            size = max(self.MIN_BYTES, 1 << max(0, nbytes - 1).bit_length())
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            self.allocated += 1
            kept = sum(b.numel() for b in self._buffers)
            while kept + size > self.max_bytes and (unused := [b for b in self._buffers if self._free(b)]):
                drop = min(unused, key=lambda b: b.numel())  # make room: the smallest unused one first
                self._buffers.remove(drop)
                kept -= drop.numel()
            if kept + size <= self.max_bytes:
                self._buffers.append(buf)
            return buf[:nbytes]

    def copy_out(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host copies (views of one staging buffer) of ``tensors``, all copies complete."""
        offsets, total = {}, 0
        for key, t in tensors.items():
            offsets[key] = total
            total += -(-t.numel() * t.element_size() // self.ALIGN) * self.ALIGN
        buf = self.take(total)
        out: dict[str, torch.Tensor] = {}
        devices = set()
        for key, t in tensors.items():
            n = t.numel() * t.element_size()
            view = buf[offsets[key] : offsets[key] + n].view(t.dtype).view(t.shape)
            view.copy_(t, non_blocking=self.pin)
            out[key] = view
            devices.add(t.device)
        for device in devices:  # the DMA copies were queued on each device's current stream
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
        return out


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
        self.staging = HostStaging(pin=self._cuda)
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
        kind = self.teacher.device.type
        # Entering a disabled autocast costs ~10 us a forward; it is needed only to switch one
        # on, or off where a caller has one on (never on the batcher's threads).
        amp = self.amp_dtype is not None or torch.is_autocast_enabled(kind)
        try:
            with (
                torch.inference_mode(),
                torch.autocast(kind, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)
                if amp
                else contextlib.nullcontext(),
            ):
                out = self._model(prepared.x)
        finally:
            for h in handles:
                h.remove()
        logits = logits_of(out)
        if logits.dtype != torch.float32:  # a call less where it is (each releases the GIL)
            logits = logits.float()
        return {"logits": logits, **captured}

    def to_host(self, outputs: dict[str, torch.Tensor] | Any) -> dict[str, torch.Tensor]:
        """Outputs on the host: on CPU as they are; from CUDA through the reused pinned
        buffers (the batcher has already reduced them to what the request asked for)."""
        if not self._cuda:
            return outputs
        if isinstance(outputs, torch.Tensor):
            return self.staging.copy_out({"": outputs})[""]
        return self.staging.copy_out(outputs)

    def __call__(self, x: torch.Tensor, layers: frozenset[str] = frozenset()) -> torch.Tensor:
        """Logits for a CPU batch, synchronously (in-process sources, precompute)."""
        return self.to_host(self.forward(self.prepare(x), layers))["logits"]

    def warmup(self, batch_sizes: list[int]) -> None:
        """Run each batch size once so the first real request pays no start-up cost
        (CUDA context, cuDNN autotuning, torch.compile)."""
        for n in sorted(set(batch_sizes)):
            x = torch.zeros((n, *self.teacher.input_shape), dtype=self.teacher.input_dtype)
            self(x)
