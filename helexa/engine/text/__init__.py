"""Text in and out of a model: tokens, chat prompts, and the streamed output read back.

- ``tokenizer``: text <-> token ids, from tokenizer.json or a GGUF's tokenizer fields.
- ``chat_template``: OpenAI-shaped messages -> the prompt text (sandboxed jinja2);
  ``templates/`` holds the built-in Qwen3 and Qwen3-Coder templates.
- ``parsers``: Qwen3 output text -> OpenAI deltas (reasoning, content, tool calls in
  Qwen3's JSON or Qwen3-Coder's XML, whichever the chat template teaches).
- ``stops``: stop strings found in streamed text, split or not.

Import from the modules: this package imports nothing.
"""
