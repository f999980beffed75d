"""How long parsing a GGUF's metadata takes: gguf-py's GGUFReader against helexa's reader.

    python bench/gguf_header.py                # synthetic Qwen3-sized tokenizer
    python bench/gguf_header.py --model /models/Qwen3-0.6B-Q8_0.gguf

The synthetic file has what dominates a real Qwen3 GGUF header: 151,936 tokens, their
int32 token types and 151,387 merges, plus the usual scalars and a few tiny tensors.
"GGUFReader + contents" is what the loader used to pay: the reader, then turning the
tokenizer fields into Python values; "read_gguf_info" is preflight as it is now. Timings
are the best of ``--repeat`` runs with the file in the page cache: Python, not the disk.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helexa.engine.checkpoint.gguf import read_gguf_info  # noqa: E402
from helexa.engine.checkpoint.gguf_header import read_gguf_header  # noqa: E402

N_TOKENS = 151_936  # Qwen3's padded vocabulary
N_MERGES = 151_387
# Byte-level BPE alphabet as GPT-2 style tokenizers print it: mostly ASCII, Ġ for a space,
# Ċ for a newline, and multi-byte characters for the non-Latin scripts.
ALPHABET = (
    "abcdefghijklmnopqrstuvwxyz" * 4
    + "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    + "ĠĠĠĠĊ的是不了人我在有他这中大来上国个到说们为子和你地出道也时年"
)


def write_synthetic(path: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    tokens = [
        "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12))) for _ in range(N_TOKENS)
    ]
    merges = [f"{rng.choice(tokens)} {rng.choice(tokens)}" for _ in range(N_MERGES)]
    writer = GGUFWriter(path, "qwen3")
    writer.add_name("synthetic-qwen3-tokenizer")
    writer.add_block_count(28)
    writer.add_context_length(40960)
    writer.add_embedding_length(1024)
    writer.add_head_count(16)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (N_TOKENS - 3) + [3, 3, 3])
    writer.add_token_merges(merges)
    writer.add_key_value("tokenizer.ggml.eos_token_id", 151645, GGUFValueType.UINT32)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}" * 50)
    for i in range(3):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(1024, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_reader_with_contents(path: Path) -> Any:
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def best_of(repeat: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a real GGUF (default: a synthetic one)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or write_synthetic(Path(tmp) / "synthetic.gguf")
        header = read_gguf_header(path)  # also warms the page cache
        tokens = len(header.get("tokenizer.ggml.tokens", []))
        merges = len(header.get("tokenizer.ggml.merges", []))
        size = header.data_offset / 2**20
        print(f"{path.name}: {size:.1f} MiB of header, {tokens} tokens, {merges} merges")
        cpu = platform.processor() or platform.machine()
        print(f"python {platform.python_version()}, numpy {np.__version__}, {cpu}")
        runs = {
            "GGUFReader": lambda: GGUFReader(path),
            "GGUFReader + contents": lambda: gguf_reader_with_contents(path),
            "read_gguf_header": lambda: read_gguf_header(path),
            "read_gguf_info": lambda: read_gguf_info(path),  # preflight: header + config
        }
        results = {name: best_of(args.repeat, fn) for name, fn in runs.items()}
        ours = results["read_gguf_header"]
        for name, seconds in results.items():
            print(f"{name:>22}: {seconds:7.3f} s  ({seconds / ours:5.1f}x ours)")


if __name__ == "__main__":
    main()
