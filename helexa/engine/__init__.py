"""The in-process PyTorch inference engine behind the local neuron.

Entry points (import them from their modules; this package imports nothing, so
``import helexa.engine`` never pulls in torch):

- ``generate.LoadedModel.load(path, device, dtype, context_length)``: a GGUF file or HF
  directory, ready to ``stream_chat`` / ``stream_completion`` / ``count_tokens``.
- ``worker.DeviceWorker(device)``: the one thread that runs all torch work for a device.
- ``loader_safetensors.load_checkpoint(path, device)``: either format as a ``Checkpoint``.
- ``models.qwen3.Qwen3.from_checkpoint(ckpt, device, dtype)``: the model itself.
"""
