"""`kd bench lm --quick` end to end, through the CLI, in a subprocess.

Speeds on a shared CI machine are noise, so no rate is compared with a number: the
checks are that every ratio is what its rounds say, that the server's padding counters
cover exactly the tokens the clients sent, and that the caches' bytes per token are the
codec's row plus the record overhead."""

from __future__ import annotations

import json
import math
import os
import statistics
import struct
import subprocess
import sys
from pathlib import Path

from kd.cache.codecs import RECORD_OVERHEAD, get_codec


def test_bench_lm_quick(tmp_path: Path) -> None:
    out = tmp_path / "lm.json"
    r = subprocess.run(
        [sys.executable, "-m", "kd", "bench", "lm", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert "kd bench lm" in r.stdout and "bytes per token per codec" in r.stdout
    res = json.loads(out.read_text())
    loads = res["loads"]
    assert set(loads) == {"b1", "b16", "b16_fp16", "mixed"}  # --quick: no GPT-2

    for name, load in loads.items():
        rounds = load["rounds"]
        assert len(rounds) == res["settings"]["rounds"] == 2
        ratios = []
        for x in rounds:
            for side in ("inprocess", "served"):
                w = x[side]
                assert w["tokens"] > 0 and w["seconds"] > 0, (name, side, w)
                assert w["tokens_per_s"] == w["tokens"] / w["seconds"]
            ratios.append(x["served"]["tokens_per_s"] / x["inprocess"]["tokens_per_s"])
            # The window covers whole requests: the real positions the server computed are
            # exactly the tokens the clients counted.
            srv = x["served"]["server"]
            assert srv["positions"] - srv["padding"] == x["served"]["tokens"], (name, x)
        assert res[f"served_over_inprocess_{name}"] == load["ratio"] == statistics.median(ratios)
        # Rounds alternate which side runs first (ABBA).
        assert [x["order"][0] for x in rounds] == ["inprocess", "served"]

    # Full-length rows: no padding; one forward per b16 request (the budget holds 16 rows).
    for name in ("b1", "b16", "b16_fp16"):
        assert loads[name]["server"]["padding"] == 0 and loads[name]["padding_share"] == 0, loads[name]
    assert loads["b16"]["rows_per_forward"] == 16 and loads["b1"]["rows_per_forward"] == 1
    # Mixed lengths: the share of padded positions the server computed, from its counters.
    served = [x["served"]["server"] for x in loads["mixed"]["rounds"]]
    share = sum(s["padding"] for s in served) / sum(s["positions"] for s in served)
    assert 0 < res["padding_share_mixed"] < 1
    assert res["padding_share_mixed"] == share
    assert 0 < res["inprocess_padding_share_mixed"] < 1
    # fp16 logits cost 2 bytes per class per token on the wire, top-16 far less.
    vocab = res["vocab_size"]
    assert loads["b16_fp16"]["reply_bytes_per_token"] == 2 * vocab
    assert loads["b16"]["reply_bytes_per_token"] < loads["b16_fp16"]["reply_bytes_per_token"]

    # Bytes per token, measured from the precomputed caches.
    per_sequence = RECORD_OVERHEAD + struct.calcsize("<I")  # header + crc, and the u32 position count
    bpt = res["bytes_per_token"]
    assert set(bpt) == set(res["settings"]["codecs"]) and "fp16" in bpt
    for codec, stats in res["caches"].items():
        assert stats["positions"] > 0
        expected = stats["positions"] * get_codec(codec).record_bytes(vocab) + stats["sequences"] * per_sequence
        assert stats["bytes"] == expected, (codec, stats)
        assert bpt[codec] == stats["bytes"] / stats["positions"]
    c = res["caches"]["fp16"]
    assert get_codec("fp16").record_bytes(vocab) == 2 * vocab
    assert math.isclose(bpt["fp16"], 2 * vocab + per_sequence * c["sequences"] / c["positions"], rel_tol=1e-12)
    block = res["settings"]["block"]
    for v in (32000, 50257):
        computed = res["bytes_per_token_computed"][str(v)]
        assert math.isclose(computed["fp16"], 2 * v + per_sequence / block, rel_tol=1e-12)
        assert computed["topk:8"] < computed["q4"] < computed["fp16"]
