"""Client dialects, as pure code, so every route speaks them the same way and each can be
tested without a server: one folder per dialect (``openai``, ``anthropic``, ``responses``)
holding its envelopes, its mapping to and from OpenAI chat (``translate``) and its stream
(``stream``); shared below them SSE (``sse``), the envelope base (``base``) and error
bodies (``errors``). OpenAI chat is the internal lingua franca; nothing here does I/O.
"""
