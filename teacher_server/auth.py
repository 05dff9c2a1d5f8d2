"""Bearer-token authentication and TLS credentials for ``kd serve``."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

# Health checks stay open: load balancers and orchestrators probe without tokens.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC whose ``authorization`` metadata is not ``Bearer <token>``."""

    def __init__(self, token: str, on_deny=None) -> None:
        if not token:
            raise ValueError("empty token")
        self._expected = f"Bearer {token}".encode()
        self._on_deny = on_deny  # () -> None: counts the refusal (kd_errors_total)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_OPEN_PREFIXES):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        if isinstance(given, str):
            given = given.encode()
        if hmac.compare_digest(given, self._expected):
            return continuation(handler_call_details)
        message = "missing bearer token" if not given else "invalid bearer token"
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def deny(_request, context):
            if self._on_deny is not None:
                self._on_deny()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(lambda it, ctx: deny(None, ctx))
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(lambda it, ctx: deny(None, ctx))
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


@dataclass(frozen=True)
class TLSConfig:
    """Server certificate and key (PEM); with ``client_ca`` clients must present a
    certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        for what, path in (("certificate", self.cert), ("key", self.key), ("client CA", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"TLS {what} file {str(path)!r} does not exist")
        # gRPC takes any bytes here and fails only later, at bind, without saying which file: check
        # that each is PEM of the right kind now.
        pems = {}
        for what, path, marker in (("certificate", self.cert, b"-----BEGIN CERTIFICATE-----"),
                                   ("key", self.key, b"PRIVATE KEY-----"),
                                   ("client CA", self.client_ca, b"-----BEGIN CERTIFICATE-----")):  # fmt: skip
            if path is None:
                continue
            pems[what] = Path(path).read_bytes()
            if marker not in pems[what]:
                raise ValueError(f"TLS {what} file {str(path)!r} is not PEM (no {marker.decode().strip('-')} block)")
        ca = pems.get("client CA")
        return grpc.ssl_server_credentials(
            [(pems["key"], pems["certificate"])],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )
