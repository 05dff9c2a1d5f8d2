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
stream_idle_timeout_s = 300         # an InferStream with nothing in flight this long is closed (kd clients reopen)

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
upload_idle_timeout_s = 60          # an upload with no chunk for this long is dropped (DEADLINE_EXCEEDED)

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

import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kd.teacher_server.access import parse_access
from kd.teacher_server.loading import device_problem
from kd.teacher_server.runner import AMP_DTYPES
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
    # The policy (teacher_server.service.StreamSlots): "per client" is per token or certificate,
    # else per identity and kd-client-instance (each kd TeacherClient sends its own, so honest
    # processes behind one address do not share 16 streams; access.stream_key). A stream with
    # nothing in flight for stream_idle_timeout_s is closed (UNAVAILABLE, trailer
    # kd-stream-closed: idle), and at either limit a new stream takes the place of the stream
    # idle longest (1 s or more; "reclaimed"), so idle streams never lock out a client with work.
    # kd's clients reopen such a stream and resend what was unanswered. Like gRPC's
    # max_connection_idle, the timeout bounds what an abandoned stream holds; 300 s is far above
    # any pause of a training loop between batches, and kd's clients do not notice it anyway.
    max_streams: int = 64
    max_streams_per_client: int = 16
    stream_window: int = 32
    stream_idle_timeout_s: float = 300.0
    max_clients: int = 10_000
    teachers: list[TeacherEntry] = field(default_factory=list)
    datasets: dict[str, str] = field(default_factory=dict)  # name -> bundled dataset ref


# The largest message gRPC takes is 2 GiB - 1 byte (a signed 32-bit length).
MAX_MESSAGE_MB = (2**31 - 1) >> 20

# Integer ranges (lo, hi; None = no bound) of the server's and a teacher's options; 0 keeps the
# documented meaning where one is listed (port: any free one; query_budget, max_queue_size:
# unbounded; threads: torch's default; max_queue_delay_us: never wait).
SERVER_RANGES: dict[str, tuple[int, int | None]] = {
    "port": (0, 65535),
    "metrics_port": (0, 65535),
    "max_message_mb": (1, MAX_MESSAGE_MB),
    "workers": (1, None),
    "query_budget": (0, None),
    "max_streams": (1, None),
    "max_streams_per_client": (1, None),
    "stream_window": (1, None),
    "max_clients": (1, None),
}
# A teacher's sizes end up in tensor shapes and C integers: max_batch_size 10**23 was torch's
# "Overflow when unpacking long long" traceback at the warm-up. 2**31 - 1 is far above any real use.
LARGEST = 2**31 - 1
TEACHER_RANGES: dict[str, tuple[int, int | None]] = {
    "max_batch_size": (1, LARGEST),
    "max_queue_delay_us": (0, LARGEST),
    "max_queue_size": (0, LARGEST),
    "threads": (0, LARGEST),
    "instances": (1, LARGEST),
    "max_gradient_batch": (1, LARGEST),
    "max_synthesis_iterations": (1, LARGEST),
    "max_jobs_queued": (1, LARGEST),
    "max_batch_tokens": (1, LARGEST),
}


def range_problem(value: int, lo: int, hi: int | None) -> str | None:
    """Why integer ``value`` lies outside lo..hi, or None."""
    if value < lo and hi in (None, LARGEST):  # a size: the bound above is only for the absurd
        return f"must be >= {lo}, got {value}"
    if value < lo or (hi is not None and value > hi):
        return f"must be in {lo}..{hi}, got {value}" if hi is not None else f"must be >= {lo}, got {value}"
    return None


def server_problem(key: str, value: object) -> str | None:
    """Why a server option's value is out of range (None where it is fine or has no range)."""
    if key in SERVER_RANGES and isinstance(value, int):
        return range_problem(value, *SERVER_RANGES[key])
    if key == "stream_idle_timeout_s" and isinstance(value, (int, float)) and not 0 < value <= MAX_IDLE_TIMEOUT_S:
        return f"must be a number of seconds in (0, {MAX_IDLE_TIMEOUT_S:g}], got {value}"
    return None


MAX_IDLE_TIMEOUT_S = 7 * 24 * 3600.0  # a week: beyond it, "never" (and no overflow of a wait)


def teacher_problem(o: TeacherOptions) -> tuple[str, str] | None:
    """(option, why) for the first out-of-range value of a teacher's options, or None: checked
    before any teacher is loaded, so a mistake costs no work."""
    for key, (lo, hi) in TEACHER_RANGES.items():
        problem = range_problem(getattr(o, key), lo, hi)
        if problem:
            return key, problem
    if not 0 < o.upload_idle_timeout_s < math.inf:
        return "upload_idle_timeout_s", f"must be a number of seconds > 0, got {o.upload_idle_timeout_s}"
    bad = [p for p in o.preferred_batch_sizes if not 1 <= p <= o.max_batch_size]
    if bad:
        return "preferred_batch_sizes", f"must lie in 1..max_batch_size={o.max_batch_size}, got {bad}"
    if o.amp not in AMP_DTYPES:
        return "amp", f"must be one of {', '.join(AMP_DTYPES)}, got {o.amp!r}"
    try:
        parse_access(o.access)
    except ValueError as e:
        return "access", str(e)
    for d in o.devices or []:
        problem = device_problem(d)
        if problem:
            return "devices", problem
    for key in ("mean", "std"):
        values = getattr(o, key)
        if values is not None and (not values or not all(math.isfinite(v) for v in values)):
            return key, f"must be one or more finite numbers, got {values}"
    if (o.mean is None) != (o.std is None):
        return "std" if o.std is None else "mean", "is missing: uint8 inputs need both mean and std, or neither"
    if o.std is not None and any(v <= 0 for v in o.std):
        return "std", f"must be > 0, got {o.std}"
    if o.mean is not None and len(o.mean) != len(o.std):
        return "std", f"needs as many values as mean ({len(o.mean)}), got {len(o.std)}"
    return None


def _matches(value: object, annotation: str) -> bool:
    """Whether a config value has a dataclass field's type (its annotation as written)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if len(kinds) > 1:
        return any(_matches(value, k) for k in kinds)
    kind = kinds[0]
    if kind.startswith("list[") and kind.endswith("]"):
        return isinstance(value, list) and all(_matches(v, kind[5:-1]) for v in value)
    checks = {
        "None": lambda v: v is None,
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
    }
    return checks[kind](value)


def _check_types(table: dict[str, Any], types: dict[str, str], where: str) -> None:
    for key, value in table.items():
        if key in types and not _matches(value, types[key]):
            raise ConfigError(f"{where}: {key} must be {types[key]}, got {value!r} ({type(value).__name__})")


def _tables(data: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    items = data.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{path}: {key} must be a list of tables ([[{key}]]), got {items!r}")
    return items


def read_table(path: str | Path) -> dict[str, Any]:
    """A TOML or YAML file's top-level table (ConfigError naming the file otherwise)."""
    return _read(Path(path))


def _read(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give the TOML or YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                          f"offset {e.start}): TOML and YAML files are UTF-8") from None  # fmt: skip
    if path.suffix in (".yaml", ".yml"):
        data = _read_yaml(text, path)
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


def _read_yaml(text: str, path: Path) -> Any:
    """One YAML document, read safely; a key given twice in one mapping is refused, as TOML does
    (PyYAML keeps the last silently: `epochs: 240` then `epochs: 1` trained 1 epoch)."""
    try:
        import yaml
    except ImportError:
        raise ConfigError("YAML configs need PyYAML (pip install pyyaml); or use TOML") from None

    class _UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN202 - PyYAML's signature
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        raise ConfigError(f"config file {str(path)!r}: key {key!r} is given twice in one mapping "
                                          f"(line {key_node.start_mark.line + 1})")  # fmt: skip
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader: plain data only
    except yaml.YAMLError as e:
        # PyYAML's message spans several lines (context, the offending line, a caret): one line here
        where = getattr(e, "problem_mark", None)
        parts = [getattr(e, "context", None), getattr(e, "problem", None)]
        problem = ", ".join(p for p in parts if p) or str(e).splitlines()[0]
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {problem}{at}") from None


def _take(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(allowed)}")


def load_config(path: str | Path) -> ServerConfig:
    path = Path(path)
    data = _read(path)
    _take(data, {"server", "teacher", "dataset"}, str(path))
    server = data.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError(f"{path}: server must be a table ([server]), got {server!r}")
    server_types = {f.name: f.type for f in fields(ServerConfig) if f.name not in ("teachers", "datasets")}
    _take(server, set(server_types), f"{path} [server]")
    _check_types(server, server_types, f"{path} [server]")
    for key, value in server.items():
        problem = server_problem(key, value)
        if problem:
            raise ConfigError(f"{path} [server]: {key} {problem}")
        if key in ("token_file", "tls_cert", "tls_key", "tls_client_ca", "host") and value == "":
            # token_file = "" served with no token at all: an empty path read as "not given"
            raise ConfigError(f"{path} [server]: {key} is empty; give the value or leave the key out")
    cfg = ServerConfig(**server)
    option_types = {f.name: f.type for f in fields(TeacherOptions)}
    for i, entry in enumerate(_tables(data, "teacher", path)):
        where = f"{path} [[teacher]] #{i + 1}"
        _take(entry, set(option_types) | {"name", "spec", "device"}, where)
        if "name" not in entry or "spec" not in entry:
            raise ConfigError(f"{where}: needs `name` and `spec`")
        if entry["name"] == "" or entry["spec"] == "":  # a teacher named "" was served; --teacher refuses it
            raise ConfigError(f"{where}: `name` and `spec` must not be empty")
        _check_types(entry, option_types | {"name": "str", "spec": "str", "device": "str"}, where)
        device = entry.get("device", "cpu")
        problem = device_problem(device)
        if problem:
            raise ConfigError(f"{where}: device {problem}")
        opts = TeacherOptions(**{k: v for k, v in entry.items() if k in option_types})
        bad = teacher_problem(opts)
        if bad:
            raise ConfigError(f"{where}: {bad[0]} {bad[1]}")
        cfg.teachers.append(TeacherEntry(entry["name"], entry["spec"], device, opts))
    for i, entry in enumerate(_tables(data, "dataset", path)):
        where = f"{path} [[dataset]] #{i + 1}"
        _take(entry, {"name", "ref"}, where)
        if "name" not in entry or "ref" not in entry:
            raise ConfigError(f"{where}: needs `name` and `ref`")
        _check_types(entry, {"name": "str", "ref": "str"}, where)
        if entry["name"] in cfg.datasets:  # a later table silently replaced the earlier one
            raise ConfigError(f"{where}: dataset name {entry['name']!r} is already given to "
                              f"{cfg.datasets[entry['name']]!r}; dataset names must be unique")  # fmt: skip
        cfg.datasets[entry["name"]] = entry["ref"]
    if not cfg.teachers:
        raise ConfigError(f"{path}: no [[teacher]] entries")
    return cfg
