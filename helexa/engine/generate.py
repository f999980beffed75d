"""Generation for one loaded model: an OpenAI request dict in, OpenAI chunk dicts out.

The loop is deliberately small and synchronous (it runs on the device's worker thread):
prefill the part of the prompt the KV cache does not already hold (the prompt cache,
helexa.engine.prefix_cache), then one token at a time ``Sampler -> StreamDecoder ->
StopMatcher -> OutputParser -> chunk``. Cancellation is a ``threading.Event`` checked
between tokens, so a closed client stream stops the GPU work within one decode step. What
the request asks for (prompt, decoding constraints, token budget) is read, or refused, by
helexa.engine.request before the loop starts.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from threading import Event
from typing import Any, Protocol

import torch

from helexa.engine.boot import Phases, import_for_cuda
from helexa.engine.checkpoint.gguf_header import GGUFHeader
from helexa.engine.checkpoint.types import Progress
from helexa.engine.grammar import Constraint, Grammar, GrammarError, grammar_tokenizer
from helexa.engine.prefix_cache import PrefixCache
from helexa.engine.request import (
    ChatPrompt,
    RequestError,
    chat_prompt,
    completion_prompt,
    prompt_tokens,
    sampling_and_budget,
)
from helexa.engine.sampling import Sampler, SamplingParams
from helexa.engine.text.chat_template import QWEN3_TEMPLATE
from helexa.engine.text.parsers import OutputParser
from helexa.engine.text.stops import StopMatcher
from helexa.engine.text.tokenizer import Tokenizer

# Context allocated when neither the request to load nor the catalogue names one: the KV
# cache is preallocated, and a model's full window (40k for Qwen3) would cost GBs unasked.
DEFAULT_CONTEXT = 8192
# Prompt tokens per prefill forward on a CPU, and the least on a GPU: bounds activation
# memory for long prompts. A GPU prefills as much of the prompt in one forward as
# PREFILL_MEMORY_SHARE of its free memory holds (prefill_chunk): a forward per chunk
# re-dequantizes every weight, and fewer, longer forwards keep the matmuls large.
PREFILL_CHUNK = 2048
PREFILL_MEMORY_SHARE = 0.5
# Host memory for snapshots of earlier conversations' KV (the prompt cache), per model,
# when the settings name none: on a GPU, one ~28k-token conversation of an 8B model
# (144 KiB a token in bf16), so a long agent session survives a side request; on a CPU
# none, since the cache is already in host memory and a copy would compete with it.
PROMPT_CACHE_MB_CUDA = 4096
# A warm-up prompt's length: past the few-row matvec, so prefill's own kernels run too.
WARM_UP_TOKENS = 16
# Of a CUDA load's progress, the share that placing the weights reports; the warm-up
# (compiles, graph captures) reports the rest.
WEIGHTS_SHARE = 0.9
log = logging.getLogger(__name__)
# One thread for every model's grammar index: it is built once per load and rarely.
_GRAMMAR_INDEXER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="helexa-grammar")
SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


class CausalLM(Protocol):
    """What the generation loop needs from a model (Qwen3, or a scripted test double)."""

    device: torch.device

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_seq(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def prefill_bytes_per_token(self) -> int: ...

    def forward(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, *, last_only: bool = False
    ) -> torch.Tensor: ...


def generation_defaults(
    generation_config: dict[str, Any], sampling: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Sampling defaults: the model's generation_config.json, overridden by the catalogue
    profile's non-null sampling values. The request overrides both (SamplingParams)."""
    out = {k: generation_config[k] for k in SAMPLING_KEYS if generation_config.get(k) is not None}
    if generation_config.get("do_sample") is False:
        out["temperature"] = 0.0
    out.update({k: v for k, v in (sampling or {}).items() if v is not None})
    return out


def eos_ids(tokenizer: Tokenizer, generation_config: dict[str, Any]) -> frozenset[int]:
    """The tokenizer's end tokens plus generation_config's (Qwen lists <|im_end|> and
    <|endoftext|> there)."""
    extra = generation_config.get("eos_token_id")
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    return frozenset({*tokenizer.eos_token_ids, *extra})


@dataclass
class _Outcome:
    """How a generation ended, filled in by ``_texts`` as it runs."""

    completion_tokens: int = 0
    finish_reason: str = "length"
    stop_sequence: str | None = None
    cancelled: bool = False


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Tokenizer
    chat_template: str = QWEN3_TEMPLATE
    defaults: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: frozenset[int] = frozenset()
    name: str = ""
    # One decode step, (tokens [1, 1], position) -> logits [1, 1, vocab], when something
    # faster than model.forward runs it (a CUDA-graph replay); None: model.forward.
    decode: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    # What the KV cache holds, to prefill only what a prompt adds to it.
    prompt_cache: PrefixCache = field(default_factory=PrefixCache)
    # The grammar engine's index of the vocabulary (about a second for Qwen3's 151k):
    # built beside the load's warm-up and waited for before the load is done; a model
    # made otherwise starts it with its first constrained request.
    _grammar_index: Future[Any] | None = field(default=None, init=False, repr=False)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        context_length: int | None = None,
        *,
        sampling_defaults: dict[str, Any] | None = None,
        name: str = "",
        progress: Progress | None = None,
        prompt_cache_mb: int | None = None,
        devices: Sequence[str | torch.device] | None = None,
        header: GGUFHeader | None = None,
        phases: Phases | None = None,
    ) -> LoadedModel:
        """Load a GGUF file or HF directory onto ``device`` (bfloat16 on CUDA, float32 on
        CPU unless ``dtype`` says otherwise) with a KV cache of ``context_length`` and
        ``prompt_cache_mb`` of host memory for prompt snapshots (None: the device's
        default). On CUDA the model is warmed up before it is returned (:meth:`warm_up`).

        ``devices``, when given, overrides ``device``; two or more split the layers
        across them (helexa.engine.models.layer_split: shares by free memory; the dtype
        and the sampler are the last device's). A split decodes with the eager forward,
        not a CUDA graph. Devices that do not exist, or a split that cannot fit, are
        refused (a SplitError) before a weight is placed.

        ``header``: a GGUF file's, as preflight parsed it, used instead of parsing it
        again while the file is unchanged. ``phases``, when given, holds the steps a
        caller timed before this (the local neuron's imports, preflight, the device's
        context): the log line names them too, so it accounts for the whole load."""
        from helexa.engine.checkpoint.safetensors import is_gguf, load_checkpoint, read_config
        from helexa.engine.models.architectures import model_class
        from helexa.engine.models.kv_cache import HostSnapshots
        from helexa.engine.models.layer_split import check_devices, load_split
        from helexa.engine.models.qwen3_next import Qwen3Next
        from helexa.engine.models.qwen3_next import decode_step as hybrid_decode_step

        path = Path(path)
        phases = Phases() if phases is None else phases
        named = check_devices(devices) if devices else None
        split = named if named is not None and len(named) > 1 else None
        device = named[-1] if named else torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        gpus = any(d.type == "cuda" for d in named or [device])
        cuda_imports = import_for_cuda() if gpus else None  # beside the weights read
        if not is_gguf(path):  # GGUF's loader checks its own metadata first
            model_class(read_config(path), str(path))
        cuda = device.type == "cuda"
        # A split reads to the host (mapped files) and moves each tensor to its device.
        where = torch.device("cpu") if split is not None else device
        share = _share(progress, 0.0, WEIGHTS_SHARE if cuda else 1.0)
        ckpt = load_checkpoint(path, where, share, header)
        phases.done("weights read")
        phases.split("weights read", ckpt.read_seconds)
        tokenizer = Tokenizer.from_checkpoint(ckpt.tokenizer)
        phases.done("tokenizer")
        architecture = model_class(ckpt.config, ckpt.source)
        model: Any
        if split is not None:
            window = int(ckpt.config.get("max_position_embeddings") or DEFAULT_CONTEXT)
            context = context_length or min(window, DEFAULT_CONTEXT)
            model = load_split(ckpt, architecture, split, dtype, context)
        else:
            model = architecture.from_checkpoint(ckpt, device, dtype)
        ckpt.tensors.clear()  # the model holds what it needs; drop the loader's references
        phases.done("model built")
        if split is None:
            context = context_length or min(model.config.max_position_embeddings, DEFAULT_CONTEXT)
            model.setup_cache(1, context)
        phases.done("cache")
        if cuda_imports is not None:
            cuda_imports.exception()  # done (a failure: the warm-up's own import says it)
            phases.done("cuda imports")  # what is left of them: they ran beside the above
        hybrid = isinstance(model, Qwen3Next)
        decode = None
        if cuda and split is None:  # replay decode steps from CUDA graphs
            from helexa.engine.models.cuda_graph import GraphDecoder

            decode = GraphDecoder(model, step=hybrid_decode_step) if hybrid else GraphDecoder(model)
        if prompt_cache_mb is None:
            prompt_cache_mb = PROMPT_CACHE_MB_CUDA if cuda else 0
        if hybrid:  # recurrent state: reusable only at its own length
            prompt_cache = PrefixCache(model.snapshots(), prompt_cache_mb << 20, exact=True)
        else:
            prompt_cache = PrefixCache(HostSnapshots(model.kv_caches), prompt_cache_mb << 20)
        loaded = cls(
            model=model,
            tokenizer=tokenizer,
            chat_template=ckpt.chat_template or QWEN3_TEMPLATE,
            defaults=generation_defaults(ckpt.generation_config, sampling_defaults),
            eos_token_ids=eos_ids(tokenizer, ckpt.generation_config),
            name=name or path.name,
            decode=decode,
            prompt_cache=prompt_cache,
        )
        index = loaded.index_grammar()  # beside the warm-up, which waits on the GPU at times
        if cuda:
            loaded.warm_up(_share(progress, WEIGHTS_SHARE, 1.0))
            phases.done("warm-up")
        # Building the index holds the GIL for its whole second (llguidance parses the
        # tokenizer's JSON in Rust without releasing it): not done, it would stall the
        # first request, and the event loop, that long. A failure is the first
        # constrained request's error, as before.
        index.exception()
        phases.done("grammar index")
        log.info("loaded %s in %s", loaded.name, phases)
        return loaded

    def warm_up(self, progress: Progress | None = None) -> None:
        """Run each kind of step a request runs once now, so that no request pays for a
        first call: Triton kernels compiled and autotuned (both kept on disk, see
        helexa.engine.quant.ops), cuBLAS and attention set up, the sampler's kernels
        loaded, and every decode graph the cache will need captured (one, where attention
        reads the live length; else one per KV-length bucket). A load is reported
        done only after this, so the first request runs at full speed. It writes
        garbage into the KV cache, so the prompt cache starts empty after it."""
        from helexa.engine.models.cuda_graph import GraphDecoder

        model = self.model
        params = SamplingParams.from_request({}, self.defaults)
        first = [0] * min(WARM_UP_TOKENS, max(1, model.max_seq // 4))
        # A prompt from position 0 (dequantize + cuBLAS or grouped GEMM, causal attention)
        # and its first decode step; then prompts extending it by 2 and by 3 tokens: the
        # prefill after a reused prefix (masked attention) at the row counts the few-row
        # matvec tunes for beyond decode's one (powers of two: 2 and 4 rows, a MoE's
        # experts 16 and 32). Their new tokens differ from what the cache holds past
        # ``first``, so each prefills exactly its extension.
        taken = list(islice(self.tokens(first, params, Event()), 2))
        fillers = [t for t in range(3) if t != taken[0]][:2]
        for extra, filler in zip((2, 3), fillers, strict=True):
            for _ in islice(self.tokens([*first, *[filler] * extra], params, Event()), 1):
                pass
        if model.device.type == "cuda":  # a MoE prefill's other row counts (see there)
            from helexa.engine.models.layer_split import LayerSplit
            from helexa.engine.models.qwen3_moe import warm_up_experts

            warm_up_experts(model.model if isinstance(model, LayerSplit) else model)
        if isinstance(self.decode, GraphDecoder):
            starts = self.decode.capture_positions()
            token = torch.zeros(1, 1, dtype=torch.long, device=model.device)
            for done, pos in enumerate(starts, 1):
                self.decode(token, pos)  # the first step at a new KV length captures its graph
                if progress is not None:
                    progress(done / len(starts))
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        self.prompt_cache.clear()
        if progress is not None:
            progress(1.0)

    @property
    def context_length(self) -> int:
        return self.model.max_seq

    @property
    def memory_bytes(self) -> int:
        """Weights + KV cache on the device, for ``/models`` vram_used_mb."""
        return self.model.nbytes

    def device_memory_bytes(self) -> dict[str, int]:
        """:attr:`memory_bytes` by device name: several for a layer split."""
        from helexa.engine.models.layer_split import LayerSplit

        if isinstance(self.model, LayerSplit):
            return self.model.device_bytes()
        return {str(self.model.device): self.model.nbytes}

    @property
    def prompt_cache_bytes(self) -> int:
        """Host memory the prompt cache's snapshots hold, for ``/models`` prompt_cache_mb."""
        return self.prompt_cache.snapshot_bytes

    # -- prompts ----------------------------------------------------------------------------

    def prepare(self, request: dict[str, Any]) -> ChatPrompt:
        """An OpenAI chat request, rendered with this model's template and read once for
        the loop (:func:`helexa.engine.request.chat_prompt`), or a RequestError."""
        return chat_prompt(
            request,
            self.chat_template,
            bos_token=self.tokenizer.bos_token,
            eos_token=self.tokenizer.eos_token,
        )

    def render(self, request: dict[str, Any]) -> str:
        """The prompt text an OpenAI chat request renders to (see :meth:`prepare`)."""
        return self.prepare(request).text

    def count_tokens(self, request: dict[str, Any]) -> int:
        return len(self.tokenizer.encode(self.render(request)))

    def constraint(self, grammar: Grammar, *, thinking: bool = False) -> Constraint:
        """One generation's decoding under ``grammar`` (helexa.engine.grammar);
        ``thinking``: the prompt ends inside ``<think>``."""
        try:
            index = self.index_grammar().result()
        except Exception as exc:
            self._grammar_index = None  # the next constrained request tries again
            raise RuntimeError(f"the grammar engine could not index the tokenizer: {exc}") from exc
        try:
            return Constraint(grammar, index, self.tokenizer.token_to_id, thinking=thinking)
        except GrammarError as exc:  # passed the request's check, not this tokenizer
            raise RequestError(str(exc), code="invalid_schema") from exc

    def index_grammar(self) -> Future[Any]:
        """The grammar engine's view of the tokenizer, built once on a background thread,
        so that the first JSON-mode or tool-forcing request does not wait for it."""
        if self._grammar_index is None:
            tok = self.tokenizer
            self._grammar_index = _GRAMMAR_INDEXER.submit(
                grammar_tokenizer, tok.to_json(), tok.vocab_size, self.eos_token_ids
            )
        return self._grammar_index

    # -- the loop ---------------------------------------------------------------------------

    def tokens(
        self,
        prompt: list[int],
        params: SamplingParams,
        cancel: Event,
        constraint: Constraint | None = None,
    ) -> Iterator[int]:
        """Sampled token ids, one forward pass each, until cancelled: callers stop it at
        EOS, a stop string or their budget. ``prompt`` must fit the KV cache with room for
        the tokens taken; the part of it the cache already holds is not computed again. A
        ``constraint`` (a grammar) masks the logits of the tokens it forbids before each
        sample and is advanced by each one taken.

        On a GPU each token's decode step is queued behind its sample before the id is
        read back, so the device computes the next token while the caller turns this one
        into text and sends it (the host's share of a step is hidden, not added): the
        cache then holds the last token yielded too, one step the caller may not use. On
        a CPU, where a queued step would run before the yield, it is fed after."""
        model, device, cache = self.model, self.model.device, self.prompt_cache
        sampler = Sampler(params, model.vocab_size, device, prompt=prompt)
        known = self.tokenizer.vocab_size  # a model's vocab is often padded past the tokenizer's
        reader = _TokenReader() if device.type == "cuda" else None
        try:
            logits = None
            begin = cache.begin(prompt)
            step = prefill_chunk(model, len(prompt) - begin)
            for start in range(begin, len(prompt), step):
                if cancel.is_set():
                    return
                chunk = prompt[start : start + step]
                tokens = torch.tensor([chunk], dtype=torch.long, device=device)
                positions = torch.arange(start, start + len(chunk), device=device)
                logits = model.forward(tokens, positions, last_only=True)
                cache.extend(chunk)
            assert logits is not None
            pos = len(prompt)
            while not cancel.is_set():
                last = logits[0, -1]
                if known < last.shape[-1]:
                    last[known:] = float("-inf")
                if constraint is not None:
                    last = constraint.mask(last)  # [vocab]: -inf where the grammar forbids it
                picked = sampler.pick(last)  # [1], on the device
                if reader is not None:
                    reader.send(picked)  # the copy to the host, queued
                    logits = self._step(picked, pos)
                    token = reader.receive()  # waits for the sample, not the step
                    cache.extend((token,))
                    pos += 1
                else:
                    token = int(picked)
                if constraint is not None:
                    constraint.advance(token)
                yield token
                if reader is None:
                    logits = self._step(picked, pos)
                    cache.extend((token,))
                    pos += 1
        except Exception:
            # A step that failed part-way (out of memory) may have written some layers'
            # cache or recurrent state and not others: nothing the device holds is trusted
            # for the next prompt, which prefills from the start (host snapshots stay).
            cache.clear()
            raise

    def _step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [1, 1, vocab] after the [1] ``token`` at ``pos``: a graph replay where
        one is captured, else the eager forward."""
        tokens = token.view(1, 1)
        if self.decode is not None:
            return self.decode(tokens, pos)
        return self.model.forward(tokens, torch.tensor([pos], device=token.device), last_only=True)

    def _texts(
        self,
        prompt: list[int],
        params: SamplingParams,
        max_tokens: int,
        cancel: Event,
        outcome: _Outcome,
        constraint: Constraint | None = None,
    ) -> Iterator[str]:
        """Decoded text safe to show (whole UTF-8 characters, no partial stop string)."""
        decoder = self.tokenizer.stream_decoder()
        stops = StopMatcher(list(params.stop or []))
        if constraint is not None and constraint.closed:  # all of it forced: nothing to sample
            outcome.finish_reason = "stop"
            return
        for token in self.tokens(prompt, params, cancel, constraint):
            outcome.completion_tokens += 1
            if token in self.eos_token_ids:
                outcome.finish_reason = "stop"
                break
            text, matched = stops.feed(decoder.add(token))
            if text:
                yield text
            if matched is not None:
                outcome.finish_reason, outcome.stop_sequence = "stop", matched
                return
            if constraint is not None and constraint.closed:
                outcome.finish_reason = "stop"  # the grammar is complete
                break
            if outcome.completion_tokens >= max_tokens:
                break
        else:
            outcome.cancelled = True  # _tokens only runs dry when cancelled
            return
        text, matched = stops.feed(decoder.flush())
        if matched is not None:
            outcome.finish_reason, outcome.stop_sequence = "stop", matched
        else:
            text += stops.flush()
        if text:
            yield text

    def stream_chat(self, request: dict[str, Any], cancel: Event) -> Iterator[dict[str, Any]]:
        """``chat.completion.chunk`` dicts: the role, content/reasoning/tool-call deltas, a
        finish chunk, then a usage chunk. Nothing more once ``cancel`` is set."""
        chat = self.prepare(request)
        prompt = prompt_tokens(chat.text, self.tokenizer.encode, self.context_length)
        params, max_tokens = sampling_and_budget(
            request, self.defaults, self.context_length, len(prompt)
        )
        thinking = chat.text.rstrip().endswith("<think>")
        constraint = None
        if chat.grammar is not None:
            constraint = self.constraint(chat.grammar, thinking=thinking)
        parser = OutputParser(
            tools=chat.tools,
            thinking=True,
            starts_in_thinking=thinking,
            continues_content=chat.continuing,
        )
        chunks = _Chunks("chat.completion.chunk", "chatcmpl", request.get("model") or self.name)
        outcome = _Outcome()

        # ``x_helexa`` is helexa's own field (the gateway strips it from OpenAI streams): the
        # prompt's size is known before the first token, and Anthropic's message_start says it.
        yield {**chunks.chat({"role": "assistant", "content": ""}), **_prompt_size(len(prompt))}
        for delta in parser.feed(chat.forced):  # a forced call start: held until it closes
            yield chunks.chat(delta)
        texts_of = self._texts(prompt, params, max_tokens, cancel, outcome, constraint)
        with closing(texts_of) as texts:
            for text in texts:
                for delta in parser.feed(text):
                    yield chunks.chat(delta)
                if chat.single_call and parser.tool_calls:
                    outcome.finish_reason = "stop"  # the one call is complete: stop here
                    break
        if outcome.cancelled:
            return
        if constraint is not None and constraint.closed and constraint.rest:
            # All that may follow is forced (a call's closing tags): written as the model
            # would have, unsampled, since nothing is generated after it.
            for delta in parser.feed(self.tokenizer.decode(constraint.rest)):
                yield chunks.chat(delta)
        for delta in parser.finish():
            yield chunks.chat(delta)
        finish = outcome.finish_reason
        if finish == "stop" and parser.tool_calls:
            finish = "tool_calls"
        yield chunks.chat({}, finish, outcome.stop_sequence)
        yield chunks.usage(len(prompt), outcome.completion_tokens, self.prompt_cache.reused)

    def stream_completion(self, request: dict[str, Any], cancel: Event) -> Iterator[dict[str, Any]]:
        """``text_completion`` chunks for a legacy completions request (raw prompt, no
        template, no parsing), then a usage chunk."""
        prompt = completion_prompt(
            request,
            lambda text: prompt_tokens(text, self.tokenizer.encode, self.context_length),
            self.model.vocab_size,
        )
        params, max_tokens = sampling_and_budget(
            request, self.defaults, self.context_length, len(prompt)
        )
        chunks = _Chunks("text_completion", "cmpl", request.get("model") or self.name)
        outcome = _Outcome()
        for text in self._texts(prompt, params, max_tokens, cancel, outcome):
            yield chunks.text(text)
        if outcome.cancelled:
            return
        yield chunks.text("", outcome.finish_reason, outcome.stop_sequence)
        yield chunks.usage(len(prompt), outcome.completion_tokens, self.prompt_cache.reused)


class _TokenReader:
    """A token id's way to the host that does not wait for the work queued after it: a
    copy into pinned memory with an event behind it, where ``int(tensor)`` would wait for
    the whole stream, the next decode step included."""

    def __init__(self) -> None:
        self.host = torch.empty(1, dtype=torch.long, pin_memory=True)
        self.copied = torch.cuda.Event()

    def send(self, token: torch.Tensor) -> None:
        self.host.copy_(token, non_blocking=True)
        self.copied.record(torch.cuda.current_stream(token.device))

    def receive(self) -> int:
        self.copied.synchronize()
        return int(self.host[0])


def prefill_chunk(model: CausalLM, tokens: int) -> int:
    """Prompt tokens per prefill forward: all ``tokens`` when a GPU's free memory (what
    the driver reports plus what torch's allocator holds unused) has room for their
    activations, else as many as fit, never fewer than PREFILL_CHUNK; PREFILL_CHUNK on a
    CPU, where attention without flash kernels grows with the square of a chunk."""
    device = model.device
    if device.type != "cuda":
        return PREFILL_CHUNK
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    fits = int(free * PREFILL_MEMORY_SHARE) // max(1, model.prefill_bytes_per_token)
    return max(PREFILL_CHUNK, min(tokens, fits))


def _prompt_size(prompt_tokens: int) -> dict[str, Any]:
    return {"x_helexa": {"prompt_tokens": prompt_tokens}}


class _Chunks:
    """Builds the chunk dicts of one response (shared id, created, model)."""

    def __init__(self, obj: str, prefix: str, model: str) -> None:
        self.base = {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": obj,
            "created": int(time.time()),
            "model": model,
        }

    @staticmethod
    def _finish(choice: dict[str, Any], finish: str | None, stop: str | None) -> dict[str, Any]:
        choice["finish_reason"] = finish
        if stop is not None:
            choice["stop_sequence"] = stop  # non-standard: Anthropic's stop_sequence needs it
        return choice

    def chat(
        self, delta: dict[str, Any], finish: str | None = None, stop: str | None = None
    ) -> dict[str, Any]:
        choice = self._finish({"index": 0, "delta": delta, "logprobs": None}, finish, stop)
        return {**self.base, "choices": [choice]}

    def text(self, text: str, finish: str | None = None, stop: str | None = None) -> dict[str, Any]:
        choice = self._finish({"index": 0, "text": text, "logprobs": None}, finish, stop)
        return {**self.base, "choices": [choice]}

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
        """OpenAI's usage; ``cached`` prompt tokens came from the prompt cache."""
        return {
            **self.base,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }


def _share(progress: Progress | None, low: float, high: float) -> Progress | None:
    """``progress`` for one stage of a load, reporting its 0..1 as ``low..high``."""
    if progress is None or (low, high) == (0.0, 1.0):
        return progress
    report = progress
    return lambda fraction: report(low + (high - low) * fraction)
