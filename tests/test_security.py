"""Bearer tokens, TLS and mutual TLS on a real server (certificates made in the test)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kd.teacher_server.auth import TLSConfig
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.loading import Teacher
from kd.teacher_server.server import start_server
from kd.v1 import teacher_pb2 as pb
from kd.v1 import teacher_pb2_grpc as pb_grpc


def _pem_key(key) -> bytes:
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(pem, pkcs8, serialization.NoEncryption())


def _cert(subject: str, key, issuer_name: x509.Name | None, issuer_key, *, ca: bool, server: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    out: dict[str, Path] = {}

    def write(name: str, data: bytes) -> None:
        out[name] = d / name
        out[name].write_bytes(data)

    for prefix in ("", "rogue_"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert(f"{prefix}kd test CA", ca_key, None, ca_key, ca=True, server=False)
        write(f"{prefix}ca.pem", ca.public_bytes(serialization.Encoding.PEM))
        for who, is_server in (("server", True), ("client", False)):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _cert(f"{prefix}{who}", key, ca.subject, ca_key, ca=False, server=is_server)
            write(f"{prefix}{who}.pem", cert.public_bytes(serialization.Encoding.PEM))
            write(f"{prefix}{who}.key", _pem_key(key))
    return out


def test_token_required(teacher: Teacher) -> None:
    running = start_server([teacher], port=0, token="s3cret")
    address = f"127.0.0.1:{running.port}"
    try:
        x = torch.rand(2, 64)
        with TeacherClient(address, token="s3cret") as c:
            assert c.infer("digits", x)["logits"].shape == (2, 10)
            assert [o["logits"].shape for _, o in c.infer_stream("digits", [(0, x)])] == [(2, 10)]
        for token, message in ((None, "missing bearer token"), ("wrong", "invalid bearer token")):
            with TeacherClient(address, token=token, timeout=5) as c:
                with pytest.raises(TeacherRequestError) as err:
                    c.infer("digits", x)
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and message in err.value.message
                with pytest.raises(TeacherRequestError) as err:
                    list(c.infer_stream("digits", [(0, x)]))
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open for load balancers.
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(grace=1)


def _refused(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    """Call the server on a raw channel (no wait-for-ready, unlike TeacherClient, which waits for the
    channel until its deadline): a refused TLS handshake is UNAVAILABLE at once, so a timeout or any
    other error does not pass for a refusal. -> the error's details."""
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.TeacherServiceStub(channel).ListTeachers(pb.ListTeachersRequest(), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), err.value.details())
    return err.value.details()


def _accepted(address: str, credentials: grpc.ChannelCredentials) -> None:
    """The same raw call with the right credentials works: the refusals above are the TLS check's."""
    with grpc.secure_channel(address, credentials) as channel:
        names = [
            t.name
            for t in pb_grpc.TeacherServiceStub(channel).ListTeachers(pb.ListTeachersRequest(), timeout=60).teachers
        ]
    assert names == ["digits"]


def test_tls_and_mutual_tls(teacher: Teacher, pki: dict[str, Path]) -> None:
    x = torch.rand(3, 64)
    tls = start_server([teacher], port=0, tls=TLSConfig(pki["server.pem"], pki["server.key"]))
    mtls = start_server([teacher], port=0, tls=TLSConfig(pki["server.pem"], pki["server.key"], pki["ca.pem"]))
    ca = pki["ca.pem"].read_bytes()
    client_cert, client_key = pki["client.pem"].read_bytes(), pki["client.key"].read_bytes()
    try:
        with TeacherClient(f"127.0.0.1:{tls.port}", root_certificates=ca) as c:
            assert c.infer("digits", x)["logits"].shape == (3, 10)
        # A plaintext client cannot talk to a TLS server.
        tls_address, mtls_address = f"127.0.0.1:{tls.port}", f"127.0.0.1:{mtls.port}"
        _accepted(tls_address, grpc.ssl_channel_credentials(ca))
        _refused(tls_address, None)
        # A client that trusts another CA refuses the server.
        rogue_ca = pki["rogue_ca.pem"].read_bytes()
        _refused(tls_address, grpc.ssl_channel_credentials(rogue_ca))
        with TeacherClient(mtls_address, root_certificates=ca, client_cert=client_cert, client_key=client_key) as c:
            assert c.infer("digits", x)["logits"].shape == (3, 10)
        # Mutual TLS: no client certificate, or one from another CA, is refused.
        _accepted(mtls_address, grpc.ssl_channel_credentials(ca, client_key, client_cert))
        _refused(mtls_address, grpc.ssl_channel_credentials(ca))
        rogue_key, rogue_cert = pki["rogue_client.key"].read_bytes(), pki["rogue_client.pem"].read_bytes()
        _refused(mtls_address, grpc.ssl_channel_credentials(ca, rogue_key, rogue_cert))
    finally:
        tls.stop(grace=1)
        mtls.stop(grace=1)


def test_missing_certificate_file_is_clear(teacher: Teacher, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="TLS certificate file"):
        start_server([teacher], port=0, tls=TLSConfig(tmp_path / "no.pem", tmp_path / "no.key"))
