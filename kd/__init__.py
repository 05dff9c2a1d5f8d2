"""kd: teacher-as-a-service knowledge distillation.

Packages: ``teacher_server`` (gRPC serving with a dynamic batcher), ``cache``
(LMDB store of teacher outputs), ``student_trainer`` (sources, KD losses,
training loops), ``kd`` (wire format, bundled data and models, the CLI).
"""

__version__ = "0.1.0"
