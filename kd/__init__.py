"""kd: teacher-as-a-service knowledge distillation.

Layers, bottom to top (``tests/test_layering.py`` fails on an arrow pointing up):

* ``kd.core`` and ``kd.v1``: the per-sample contract (teacher signature, sample
  sources, targets, wire codec, feature reductions, generated stubs).
* ``kd.teacher_server`` (folder ``teacher_server/``: gRPC serving with a dynamic
  batcher and its client) and ``kd.cache`` (folder ``cache/``: LMDB store of
  teacher outputs).
* ``kd.student_trainer`` (folder ``student_trainer/``: sources, KD losses, training).
* the application: ``kd.cli``, ``kd.bench``, demos, ``kd.precompute``, ``kd.chain``.
"""

__version__ = "0.1.0"
