"""Generated gRPC/protobuf stubs for ``proto/kd/v1/teacher.proto`` (do not edit).

Regenerate with ``python -m kd.protogen`` after changing the ``.proto``; a
test fails when these are stale.
"""
