"""What a request feels through the real server: ``helexa --serve`` over HTTP, beside
llama.cpp on the same GGUF in the same run (llama-bench for rates, llama-server for
request timings).

For each prompt length (default 512, 4096, 16384, 32768): time to first token and decode
tok/s of a streamed ``/v1/completions`` request (the prompt is that many byte tokens of the
placeholder vocab bench/synthetic.py writes, so tokens are exact); then a second turn that
extends the first prompt by 200 tokens (what a coding agent sends: prefix reuse shows as
``cached_tokens`` and a short TTFT); before all of it, the load and the first request after
it (compile and graph capture show here). llama-bench runs ``-p N -n 0`` and ``-n 128 -d N``
at the same lengths, and llama-server (its prompt cache on, as by default) is sent the
very same requests, so the ratios compare like with like::

    python bench/serve.py --gguf /tmp/hx/q8b.gguf --out $OUT                 # helexa side
    python bench/serve.py --gguf /tmp/hx/q8b.gguf --llama-work /tmp/llama --out $OUT

A missing ``--gguf`` is written first, random blocks of ``--preset``'s shape (any of
bench/synthetic.py's: a dense Qwen3, the Qwen3-MoE ``qwen3-30b-a3b``, the Qwen3.5 hybrid
``qwen3.5-9b``; ``--layers`` etc. change it), on the GPU when there is one. The server
path is the same for every architecture. A CPU smoke run of the helexa side::

    python bench/serve.py --gguf /tmp/m.gguf --preset qwen3-moe-tiny \
        --lengths 64,128 --gen 8 --context 512 --out /tmp/m

Prints one table and writes ``serve.json`` under ``--out`` (both sides' numbers, while
they are of the same file).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib import error as urlerror
from urllib import request as urlrequest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synthetic import PRESETS, SHAPE_KEYS, preset_shape, write_shape  # noqa: E402

MODEL = "bench"
LETTERS = string.ascii_letters + string.digits  # one byte token each, no merges


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any], timeout: float = 900.0) -> Any:
    data = json.dumps(body).encode()
    req = urlrequest.Request(url, data=data, headers={"content-type": "application/json"})
    with urlrequest.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _stream(url: str, prompt: str, max_tokens: int) -> dict[str, float]:
    """One streamed completion: TTFT, decode tok/s over the tokens after the first, and
    the usage the server reported (prompt, completion and cached tokens)."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urlrequest.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    start = time.perf_counter()
    first = last = None
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    with urlrequest.urlopen(req, timeout=900) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("timings"):  # llama-server's own account of the request
                timings = chunk["timings"]
            if any(c.get("text") for c in chunk.get("choices") or []):
                last = time.perf_counter()
                first = first or last
    assert first is not None and last is not None, "no token streamed"
    generated = int(usage.get("completion_tokens") or timings.get("predicted_n") or 0)
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") or timings.get("cache_n") or 0
    return {
        "ttft ms": (first - start) * 1e3,
        "decode tok/s": (generated - 1) / (last - first) if generated > 1 else float("nan"),
        "prompt tokens": float(usage.get("prompt_tokens", 0)),
        "cached tokens": float(cached),
    }


def _letters(n: int, rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``url``/health answers 200 (llama-server answers 503 while it loads)."""
    for _ in range(3000):
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])
        try:
            urlrequest.urlopen(f"{url}/health", timeout=1).read()
            return
        except (OSError, urlerror.HTTPError):
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-2000:]}")


def bench_turns(url: str, lengths: list[int], gen: int) -> dict[str, Any]:
    """The same requests against any OpenAI-style server: the first request, then per
    length a fresh prompt and its second turn (+200 tokens). Seeded, so both servers are
    sent the very same prompts."""
    rng = random.Random(0)
    out: dict[str, Any] = {"first request ttft ms": _stream(url, _letters(64, rng), 8)["ttft ms"]}
    for n in lengths:
        prompt = _letters(n, rng)
        out[f"{n}"] = _stream(url, prompt, gen)
        out[f"{n} turn 2"] = _stream(url, prompt + _letters(200, rng), 32)
    return out


def bench_helexa(gguf: Path, lengths: list[int], gen: int, context: int) -> dict[str, Any]:
    port = _free_port()
    work = Path(tempfile.mkdtemp(prefix="helexa-serve-"))
    (work / "models.toml").write_text(
        f'[[models]]\nid = "{MODEL}"\npath = "{gguf.resolve()}"\ncontext_length = {context}\n'
    )
    (work / "helexa.toml").write_text(
        f'[gateway]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = "127.0.0.1:{_free_port()}"\n'
    )
    cmd = [sys.executable, "-m", "helexa.cli", "--config", str(work / "helexa.toml")]
    cmd += ["--models", str(work / "models.toml"), "--serve"]
    # The server is this checkout's helexa, as the writer was, not whichever is installed,
    # nor one in the caller's directory (``-m`` puts the working directory first: stop 30's
    # A/B of two checkouts, run from one's root, measured that one twice).
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    log = work / "serve.log"
    spawned = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        _wait_ready(url, proc, log)
        out["start s"] = time.perf_counter() - spawned
        for _ in range(300):  # the local node joins the fleet just after the gateway listens
            try:
                start = time.perf_counter()
                _post(f"{url}/admin/models/load", {"model": MODEL})
                break
            except urlerror.HTTPError as exc:
                if exc.code != 503:
                    raise RuntimeError(exc.read().decode()) from None
                time.sleep(0.2)
        out["load s"] = time.perf_counter() - start
        out.update(bench_turns(url, lengths, gen))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        out["log tail"] = log.read_text()[-2000:]
    return out


def bench_llama_server(
    work: Path, src: Path, gguf: Path, lengths: list[int], gen: int, context: int
) -> dict[str, Any]:
    """llama.cpp's own server on the same file, the same requests (its prompt cache on, as
    by default): the peer for the first request and the second turn."""
    from bench.llama_cpp import build

    binary = build(src, work, target="llama-server")
    port = _free_port()
    log = work / "llama-server.log"
    cmd = [str(binary), "-m", str(gguf), "-ngl", "99", "-fa", "on", "-c", str(context)]
    cmd += ["-np", "1", "--host", "127.0.0.1", "--port", str(port)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        _wait_ready(url, proc, log)
        out["load s"] = time.perf_counter() - start
        out.update(bench_turns(url, lengths, gen))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        out["log tail"] = log.read_text()[-2000:]
    return out


def bench_llama(work: Path, src: Path, gguf: Path, lengths: list[int], gen: int) -> dict:
    from bench.llama_cpp import build, run_bench

    binary = build(src, work)
    records = run_bench(binary, gguf, prompts=tuple(lengths), gen=0, reps=3)
    out: dict[str, float] = {f"pp{r['n_prompt']}": float(r["avg_ts"]) for r in records}
    for n in (0, *lengths):
        depth = ("-d", str(n)) if n else ()
        for r in run_bench(
            binary, gguf, prompts=(0,), gen=gen, reps=3, extra=("-ngl", "99", "-fa", "1", *depth)
        ):
            if r["n_gen"]:
                out[f"tg{gen}@d{n}"] = float(r["avg_ts"])
    return out


def table(
    helexa: dict[str, Any],
    llama: dict[str, float],
    server: dict[str, Any],
    lengths: list[int],
    gen: int,
) -> str:
    """helexa beside llama-bench's rates (prefill, decode at depth) and llama-server's
    request timings (first request, TTFT, the second turn)."""
    rows = ["| case | helexa | llama.cpp | ratio |", "|---|---:|---:|---:|"]

    def row(name: str, ours: float | None, theirs: float | None, unit: str, lower: bool) -> None:
        # ratio > 1 means helexa is better: rates divide as they are, times the other way
        ratio = ""
        if ours and theirs:
            ratio = f"{(theirs / ours if lower else ours / theirs):.2f}"
        fmt = lambda v: "" if v is None else f"{v:,.1f} {unit}"  # noqa: E731
        rows.append(f"| {name} | {fmt(ours)} | {fmt(theirs)} | {ratio} |")

    row("process start to /health", helexa.get("start s"), None, "s", True)
    row("load (page-cached file)", helexa.get("load s"), server.get("load s"), "s", True)
    first = "first request after load: TTFT"
    row(first, helexa.get("first request ttft ms"), server.get("first request ttft ms"), "ms", True)
    short = (helexa.get(str(lengths[0])) or {}).get("decode tok/s")
    row(
        f"decode tg{gen} @ short prompt (llama-bench)",
        short,
        llama.get(f"tg{gen}@d0"),
        "tok/s",
        False,
    )
    for n in lengths:
        one, two = helexa.get(str(n)) or {}, helexa.get(f"{n} turn 2") or {}
        peer_one, peer_two = server.get(str(n)) or {}, server.get(f"{n} turn 2") or {}
        ttft = one.get("ttft ms")
        rate = n / ttft * 1e3 if ttft else None
        row(
            f"prefill {n}: tok/s from TTFT (llama-bench pp)",
            rate,
            llama.get(f"pp{n}"),
            "tok/s",
            False,
        )
        row(f"TTFT {n} (llama-server)", ttft, peer_one.get("ttft ms"), "ms", True)
        row(
            f"decode after {n} (llama-bench -d)",
            one.get("decode tok/s"),
            llama.get(f"tg{gen}@d{n}"),
            "tok/s",
            False,
        )
        cached = two.get("cached tokens")
        row(
            f"turn 2 on the {n} prefix: TTFT ({cached or 0:.0f} cached; llama-server)",
            two.get("ttft ms"),
            peer_two.get("ttft ms"),
            "ms",
            True,
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gguf", type=Path, required=True, help="written (--preset) unless it exists")
    ap.add_argument("--lengths", default="512,4096,16384,32768")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--context", type=int, default=40960, help="both servers' context")
    ap.add_argument("--llama-work", type=Path, help="llama.cpp build dir: run llama-bench")
    ap.add_argument("--llama-src", type=Path, default=Path(".device/llama-src.tar.gz"))
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument(
        "--preset",
        default="qwen3-8b",
        choices=sorted(PRESETS),
        help="shape (and so architecture) of a --gguf written here",
    )
    for key in SHAPE_KEYS:
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"override the preset's {key}")
    ap.add_argument("--quant", default="Q4_K_M", help="of a --gguf written here")
    ap.add_argument("--write-device", help="where a --gguf written here is quantized")
    args = ap.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    try:
        shape = preset_shape(args.preset, **{k: getattr(args, k) for k in SHAPE_KEYS})
    except ValueError as exc:
        ap.error(str(exc))
    written = write_shape(args.gguf, shape, args.quant, args.write_device)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "serve.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("gguf") != args.gguf.name:  # another file's numbers: not this table's
        results = {"gguf": args.gguf.name}
    results["gguf MB"] = args.gguf.stat().st_size / 2**20
    if written:
        results |= {"gguf write s": written, "preset": args.preset, "shape": shape}
    print(
        f"# {args.gguf.name}: {results['gguf MB']:,.1f} MiB"
        + (f", written in {written:.1f} s ({args.preset} {args.quant})" if written else ""),
        file=sys.stderr,
    )
    if args.llama_work:
        results["llama.cpp"] = bench_llama(
            args.llama_work, args.llama_src, args.gguf, lengths, args.gen
        )
        path.write_text(json.dumps(results, indent=1))
        try:
            results["llama-server"] = bench_llama_server(
                args.llama_work, args.llama_src, args.gguf, lengths, args.gen, args.context
            )
        except (RuntimeError, OSError, AssertionError) as exc:
            print(f"llama-server: {exc}", file=sys.stderr)
    else:
        results["helexa"] = bench_helexa(args.gguf, lengths, args.gen, args.context)
    path.write_text(json.dumps(results, indent=1))
    print(
        table(
            results.get("helexa", {}),
            results.get("llama.cpp", {}),
            results.get("llama-server", {}),
            lengths,
            args.gen,
        )
    )
    return 0


if __name__ == "__main__":
    # A SIGTERM to the bench alone (`kill PID`; `timeout` signals the whole group) exits
    # through the finally blocks, so the servers it started stop instead of holding the GPU.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
