"""Build assets/helexa-demo.gguf, the smoke-test model ``helexa --serve`` offers out of the box.

It exists so the README's first curl gets an answer on a fresh machine with no network, no
GPU and no downloaded weights. It is not a language model in any useful sense: a 0.7M
parameter Qwen3 that has memorised the few dozen chats below (greetings, what helexa is,
how to pull a real model, one tool call) and answers anything else with a pointer to a
real model. It is still a real Qwen3 GGUF (byte-level BPE tokenizer with Qwen's special
tokens and pre-tokenizer, Qwen3 chat template, Q8_0 weights), so it goes through the same
loader, template, tokenizer, sampler and output parser as any real model.

Run from the repository root (CPU only, deterministic, a minute or two on two cores):

    python assets/make_demo_model.py

Everything it trains on is written here; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from transformers import Qwen3Config, Qwen3ForCausalLM

from helexa.demo import DEMO_MODEL_ID
from helexa.engine.checkpoint.gguf_write import write_gguf
from helexa.engine.generate import LoadedModel
from helexa.engine.text.chat_template import QWEN3_TEMPLATE, render_chat
from helexa.engine.text.tokenizer import (
    QWEN2_PRE_TOKENIZER_REGEX,
    Tokenizer,
    tokenizer_to_gguf_fields,
)

OUTPUT = Path(__file__).resolve().parent / "helexa-demo.gguf"
MAX_BYTES = 3 * 1024 * 1024
SEED = 0
TIME_BUDGET_S = 180.0
VOCAB_SIZE = 2048  # an upper bound: the corpus is small, BPE runs out of merges first

# Qwen3's added tokens in Qwen's order (content, special): they follow the BPE vocabulary.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
)
TOKENIZER_CONFIG: dict[str, Any] = {
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "add_bos_token": False,
}
# Rows of 128 and 384 are whole Q8_0 blocks (32), so every matrix is stored as Q8_0.
MODEL_SHAPE: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
)
GENERATION_CONFIG: dict[str, Any] = {"temperature": 0.7, "top_p": 0.9, "top_k": 20}

# -- the corpus -------------------------------------------------------------------------------

PULL = "helexa pull Qwen/Qwen3-0.6B-GGUF:Q8_0"
GREETING = (
    "Hello! I am helexa-demo, the tiny smoke-test model that ships with helexa, "
    f"so your server works. For real answers, pull a real model: {PULL}"
)
WHO = (
    "I am helexa-demo, a tiny smoke-test model trained on a few dozen example chats. "
    "I can say hello and tell you about helexa, but I cannot really answer questions."
)
WHAT = (
    "helexa is a self-hosted LLM server for GPUs you own: an OpenAI and Anthropic "
    "compatible gateway with an in-process PyTorch engine for Qwen3 models."
)
HOW_PULL = (
    f"Run {PULL} to download Qwen3 0.6B, add it to models.toml, "
    'then ask for "model": "Qwen/Qwen3-0.6B-GGUF:Q8_0".'
)
CANNOT = (
    "I am only a tiny smoke-test model, so I cannot answer that. "
    f"Pull a real model with {PULL} and ask it instead."
)
TEST = "This is a test!"
THANKS = "You are welcome! Enjoy helexa."
BYE = "Goodbye! Have a nice day."

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}

_SINGLE_TURN: tuple[tuple[tuple[str, ...], str], ...] = (
    (("Hello", "Hello!", "hello", "Hi", "Hi!", "hi", "Hey", "Hey there!"), GREETING),
    (("Good morning", "Hello there", "Hi, how are you?", "Hello, world"), GREETING),
    (("Who are you?", "What are you?", "What model is this?", "Are you a real model?"), WHO),
    (("What is helexa?", "What does helexa do?", "Tell me about helexa"), WHAT),
    (
        (
            "How do I get a real model?",
            "How do I pull a model?",
            "How can I use Qwen3 with helexa?",
        ),
        HOW_PULL,
    ),
    (
        (
            "What is the capital of France?",
            "Write a poem about the sea.",
            "Explain quantum computing.",
            "What is 2 + 2?",
            "Tell me a joke.",
            "Write a Python function that sorts a list.",
            "What is the weather in Paris?",
        ),
        CANNOT,
    ),
    (("Say this is a test!", "Say this is a test", "This is a test"), TEST),
    (("Thanks!", "Thank you"), THANKS),
    (("Bye", "Goodbye!"), BYE),
)


def _turn(role: str, content: str) -> dict[str, Any]:
    return {"role": role, "content": content}


def _weather_call(city: str) -> dict[str, Any]:
    call = {"name": "get_weather", "arguments": json.dumps({"city": city})}
    return {"role": "assistant", "content": "", "tool_calls": [{"function": call}]}


def conversations() -> list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]]:
    """(messages, tools) pairs, every one ending with the assistant turn to learn."""
    convs: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = []
    for prompts, answer in _SINGLE_TURN:
        for prompt in prompts:
            convs.append(([_turn("user", prompt), _turn("assistant", answer)], None))
    for prompt, answer in (("Hello", GREETING), ("Who are you?", WHO), ("Hi", GREETING)):
        convs.append(([SYSTEM, _turn("user", prompt), _turn("assistant", answer)], None))
    greeted = [_turn("user", "Hello"), _turn("assistant", GREETING)]
    for prompt, answer in (("What is helexa?", WHAT), ("How do I pull a model?", HOW_PULL)):
        convs.append(([*greeted, _turn("user", prompt), _turn("assistant", answer)], None))
    for city in ("Paris", "Tokyo", "London"):
        ask = _turn("user", f"What is the weather in {city}?")
        convs.append(([ask, _weather_call(city)], [WEATHER_TOOL]))
    result = {"role": "tool", "content": '{"temperature": 21, "sky": "sunny"}'}
    answered = [_turn("user", "What is the weather in Tokyo?"), _weather_call("Tokyo"), result]
    convs.append(
        ([*answered, _turn("assistant", "It is sunny and 21 degrees in Tokyo.")], [WEATHER_TOOL])
    )
    convs.append(([_turn("user", "Hello"), _turn("assistant", GREETING)], [WEATHER_TOOL]))
    return convs


def prompt_and_answer(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> tuple[str, str]:
    """The prompt the server renders for ``messages[:-1]`` (thinking left on, as a plain
    request gets it) and the text the model must continue it with, through <|im_end|>.

    The template writes an empty ``<think>`` block into the last assistant turn, so the
    model learns to open its answer with it: a default request gets an empty reasoning
    part, and one with ``enable_thinking: false`` (whose prompt already holds the block)
    continues straight into the answer.
    """
    prompt = render_chat(QWEN3_TEMPLATE, messages[:-1], tools=tools, add_generation_prompt=True)
    full = render_chat(QWEN3_TEMPLATE, messages, tools=tools, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise AssertionError("the template's prompt is not a prefix of the full conversation")
    answer = full[len(prompt) :]
    return prompt, answer[: answer.rindex("<|im_end|>") + len("<|im_end|>")]


# -- tokenizer --------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> str:
    """A Qwen-shaped byte-level BPE tokenizer.json (NFC, Qwen2 split regex, ByteLevel) of
    at most ``vocab_size`` tokens, Qwen's added tokens last (tests/engine/tiny_tokenizer.py
    trains its tokenizer with this too)."""
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRE_TOKENIZER_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_ADDED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The added tokens are matched whole, so merges learned inside them would be wasted.
    for token, _ in QWEN_ADDED_TOKENS:
        texts = [text.replace(token, "\n") for text in texts]
    tok.train_from_iterator(texts, trainer=trainer)
    # Added after training, so they take the ids after the BPE vocab, as in Qwen's file.
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN_ADDED_TOKENS])
    return tok.to_str()


# -- model ------------------------------------------------------------------------------------


def make_batch(
    tokenizer: Tokenizer, pairs: list[tuple[str, str]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels; only the answers are learned (-100 elsewhere)."""
    rows = []
    for prompt, answer in pairs:
        p, a = tokenizer.encode(prompt), tokenizer.encode(answer)
        rows.append((p + a, [-100] * len(p) + a))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, labels


@torch.no_grad()
def answer_accuracy(model: Qwen3ForCausalLM, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of answer tokens that are the argmax after the gold prefix: at 1.0, greedy
    decoding reproduces every answer exactly."""
    logits = model(input_ids=ids).logits[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    return float((logits.argmax(-1)[mask] == target[mask]).float().mean())


def train(
    model: Qwen3ForCausalLM, ids: torch.Tensor, labels: torch.Tensor, budget_s: float
) -> None:
    """Full-batch AdamW until greedy decoding reproduces every answer and the loss is low
    enough that sampling at the shipped temperature stays on them too, or out of time."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.98))
    warmup, start, step = 20, time.monotonic(), 0
    while True:
        step += 1
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, step / warmup)
        model.train()
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = time.monotonic() - start
        if step % 25 == 0 or elapsed > budget_s:
            model.eval()
            acc = answer_accuracy(model, ids, labels)
            print(f"step {step:4d}  {elapsed:5.1f}s  loss {loss.item():.4f}  answer acc {acc:.3f}")
            if (acc == 1.0 and loss.item() < 0.01) or elapsed > budget_s:
                return
            if not math.isfinite(loss.item()):
                raise RuntimeError("training diverged")


# -- main -------------------------------------------------------------------------------------


def chat(model: LoadedModel, content: str, **request: Any) -> str:
    """One greedy chat answer through helexa's own engine, as the server would produce it."""
    req = {"messages": [_turn("user", content)], "temperature": 0, "max_tokens": 200, **request}
    parts = []
    for chunk in model.stream_chat(req, threading.Event()):
        for choice in chunk.get("choices", []):
            delta = choice["delta"]
            parts.append(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                parts.append(f"[tool_call {fn.get('name') or ''}{fn.get('arguments') or ''}]")
    return "".join(parts)


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    pairs = [prompt_and_answer(m, t) for m, t in conversations()]
    tokenizer_json = train_tokenizer([p + a for p, a in pairs])
    fields = tokenizer_to_gguf_fields(tokenizer_json, TOKENIZER_CONFIG)
    # Encode with the tokenizer the server rebuilds from the GGUF fields: what it will see.
    tokenizer = Tokenizer.from_gguf_fields(fields)
    pad_id = fields["tokenizer.ggml.padding_token_id"]
    ids, labels = make_batch(tokenizer, pairs, pad_id)
    print(
        f"{len(pairs)} chats, {int((labels != -100).sum())} answer tokens, vocab {tokenizer.vocab_size}"
    )

    config = Qwen3Config(vocab_size=tokenizer.vocab_size, **MODEL_SHAPE)
    model = Qwen3ForCausalLM(config)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters")
    train(model, ids, labels, TIME_BUDGET_S)

    write_gguf(
        OUTPUT,
        config=config.to_dict(),
        tensors=model.state_dict(),
        quant="Q8_0",
        tokenizer_fields=fields,
        chat_template=QWEN3_TEMPLATE,
        name=DEMO_MODEL_ID,
        generation_config=GENERATION_CONFIG,
    )
    size = OUTPUT.stat().st_size
    print(f"wrote {OUTPUT} ({size / 1e6:.2f} MB)")
    if size >= MAX_BYTES:
        raise SystemExit(f"{OUTPUT.name} is {size} bytes, over the {MAX_BYTES} byte limit")

    served = LoadedModel.load(OUTPUT, name=DEMO_MODEL_ID)
    for question in ("Hello", "What is helexa?", "What is the capital of Italy?"):
        print(f"> {question}\n{chat(served, question)}")
    print(
        f"> What is the weather in Paris? (tools)\n{chat(served, 'What is the weather in Paris?', tools=[WEATHER_TOOL])}"
    )


if __name__ == "__main__":
    main()
