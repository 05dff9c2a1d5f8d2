"""Multi-task and cross-domain distillation on the bundled digits (no download).

``nets``: small CNNs with a shared encoder and named task heads; ``multitask``: knowledge
distillation for multi-task learning (Li & Bilen 2020) with task-specific teachers and
adaptors (``kd multitask``); ``taskdistill``: domain adaptation through task distillation
(Zhou, Kalra & Krähenbühl 2020) from digits to a re-rendered target domain (``kd taskdistill``).
"""
