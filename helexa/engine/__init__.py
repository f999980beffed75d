"""The in-process PyTorch inference engine behind the local neuron.

Entry points (import them from their modules; this package and its subpackages import
nothing, so ``import helexa.engine`` never pulls in torch):

- ``generate.LoadedModel.load(path, device, dtype, context_length)``: a GGUF file or HF
  directory, ready to ``stream_chat`` / ``stream_completion`` / ``count_tokens``.
- ``worker.DeviceWorker(device)``: the one thread that runs all torch work for a device.
- ``checkpoint.safetensors.load_checkpoint(path, device)``: either format as a ``Checkpoint``.
- ``models.architectures.model_class(config).from_checkpoint(ckpt, device, dtype)``: the
  model itself (``models.qwen3.Qwen3``, ``models.qwen3_moe.Qwen3Moe``, or one of the
  hybrid ``models.qwen3_next`` classes: Qwen3-Next, Qwen3.5, Qwen3.5-MoE).

Layout: ``generate`` (the model and its token loop), ``request`` (an OpenAI request read
into a prompt and a token budget), ``sampling``, ``grammar`` (decoding held to a JSON
schema or a tool-call syntax), ``worker`` and ``boot`` (a load's steps timed, and what it
imports when; torch-free, so the neuron times a load from before torch exists) at the top;
``checkpoint/`` (files on disk -> Checkpoint), ``quant/`` (quantized weights and matmuls),
``models/`` (Qwen3, Qwen3-MoE, the hybrid Qwen3-Next/Qwen3.5, the KV cache and the
recurrent state, CUDA graphs, parallelism) and ``text/``
(tokenizer, chat templates, output parsing, stop strings) below.
"""
