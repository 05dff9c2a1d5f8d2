"""``kd serve --config FILE``: teachers, datasets and server options in TOML or YAML.

```toml
[server]
host = "0.0.0.0"
port = 50051
max_message_mb = 256
token_file = "/etc/kd/token"        # bearer token; clients send "authorization: Bearer <token>"
tls_cert = "server.pem"             # TLS; add tls_client_ca for mutual TLS
tls_key = "server.key"
metrics_port = 9090                 # Prometheus /metrics
max_streams = 64                    # open InferStream/Synthesize calls; 16 per client (max_streams_per_client)

[[teacher]]
name = "resnet"
spec = "mypkg.models:resnet50@/models/r50.safetensors"
device = "cuda:0"
amp = "bf16"
compile = false
channels_last = true
instances = 2                       # model copies fed by one batcher (Triton's instance groups)
devices = ["cuda:0", "cuda:1"]      # where the instances go, round-robin [device]
max_batch_size = 256
preferred_batch_sizes = [64, 128]
max_queue_delay_us = 2000           # waited only where company comes (a lone client never waits)
max_queue_size = 4096
mean = [0.485, 0.456, 0.406]        # uint8 inputs: x/255 normalised per channel
std = [0.229, 0.224, 0.225]
accept_weights = false              # true: clients may replace the weights while serving (PublishWeights, kd peer)

[[teacher]]
name = "lm"
spec = "hf:/models/gpt2-small"        # a local Hugging Face LM directory (config + safetensors)
max_batch_tokens = 8192             # token teachers: positions per forward, padding included

[[dataset]]
name = "digits-train"
ref = "digits:train"
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kd.teacher_server.server import TeacherOptions


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


@dataclass
class TeacherEntry:
    name: str
    spec: str
    device: str = "cpu"
    options: TeacherOptions = field(default_factory=TeacherOptions)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    max_message_mb: int = 256
    workers: int = 32
    trust_archive: bool = False
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    metrics_port: int | None = None
    # Per client: samples + gradient samples before RESOURCE_EXHAUSTED (0 = no budget).
    query_budget: int = 0
    # Long-lived calls (InferStream, Synthesize) at once, overall and per client; requests per
    # stream between read and answered; clients remembered by the query accounting.
    max_streams: int = 64
    max_streams_per_client: int = 16
    stream_window: int = 32
    max_clients: int = 10_000
    teachers: list[TeacherEntry] = field(default_factory=list)
    datasets: dict[str, str] = field(default_factory=dict)  # name -> bundled dataset ref


def read_table(path: str | Path) -> dict[str, Any]:
    """A TOML or YAML file's top-level table (ConfigError naming the file otherwise)."""
    return _read(Path(path))


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("YAML configs need PyYAML (pip install pyyaml); or use TOML") from None
        data = yaml.safe_load(text)
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table/mapping at the top")
    return data


def _take(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(allowed)}")


def load_config(path: str | Path) -> ServerConfig:
    path = Path(path)
    data = _read(path)
    _take(data, {"server", "teacher", "dataset"}, str(path))
    server = dict(data.get("server", {}))
    server_keys = {f.name for f in fields(ServerConfig)} - {"teachers", "datasets"}
    _take(server, server_keys, f"{path} [server]")
    cfg = ServerConfig(**server)
    option_keys = {f.name for f in fields(TeacherOptions)}
    for i, entry in enumerate(data.get("teacher", [])):
        where = f"{path} [[teacher]] #{i + 1}"
        _take(entry, option_keys | {"name", "spec", "device"}, where)
        if "name" not in entry or "spec" not in entry:
            raise ConfigError(f"{where}: needs `name` and `spec`")
        opts = TeacherOptions(**{k: v for k, v in entry.items() if k in option_keys})
        cfg.teachers.append(TeacherEntry(entry["name"], entry["spec"], entry.get("device", "cpu"), opts))
    for i, entry in enumerate(data.get("dataset", [])):
        where = f"{path} [[dataset]] #{i + 1}"
        _take(entry, {"name", "ref"}, where)
        if "name" not in entry or "ref" not in entry:
            raise ConfigError(f"{where}: needs `name` and `ref`")
        cfg.datasets[entry["name"]] = entry["ref"]
    if not cfg.teachers:
        raise ConfigError(f"{path}: no [[teacher]] entries")
    return cfg
