"""Model providers, one per wire API, behind one :class:`~helexa.acp.providers.base.Provider`."""

from __future__ import annotations

import aiohttp

from helexa.acp.config import Endpoint
from helexa.acp.providers.anthropic_messages import AnthropicMessagesProvider
from helexa.acp.providers.base import HttpProvider
from helexa.acp.providers.openai_chat import OpenAIChatProvider
from helexa.acp.providers.openai_responses import OpenAIResponsesProvider

PROVIDERS: dict[str, type[HttpProvider]] = {
    "openai-chat": OpenAIChatProvider,
    "openai-responses": OpenAIResponsesProvider,
    "anthropic-messages": AnthropicMessagesProvider,
}


def build_provider(endpoint: Endpoint, http: aiohttp.ClientSession) -> HttpProvider:
    return PROVIDERS[endpoint.wire_api](endpoint, http)
