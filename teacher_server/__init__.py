"""The teacher server: model loading, a dynamic batcher per teacher, the gRPC layer.

Pieces with small interfaces (after Triton): ``loading`` turns a SPEC into a
``Teacher`` (model + fingerprint + shapes); ``runner`` runs batches on the
teacher's device; ``batcher`` merges requests from all clients into forwards;
``service`` is the RPC layer; ``server`` wires them into a ``grpc.Server``;
``client`` is what students call.
"""
