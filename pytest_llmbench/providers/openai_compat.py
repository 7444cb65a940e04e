"""The plugin's own provider: OpenAI-compatible endpoints through the official ``openai`` SDK.

One attempt = one ``POST {base_url}/chat/completions`` made by the SDK's client (``OpenAI``,
or ``AzureOpenAI`` when the model's config has ``api_version`` or its host is
``*.openai.azure.com``), with the SDK's retries off (``max_retries=0``): the retry policy,
Retry-After handling and error classes are the API layer's (``api.py``).

* **Clients.** One per endpoint, key, proxy and TLS context, cached for the life of the
  process: an item host keeps its connections alive between the items it runs. ``import
  openai`` (~0.8 s of CPU) and a first request (lazy imports) happen once, in the fork
  server's warm-up (``warm_up``), before it forks the hosts. This module does not import
  the SDK: the pytest process chooses the provider without paying for it; the SDK side
  (clients, the attempt, its classification) is ``openai_sdk.py``.
* **Deadline and size.** The SDK returns the raw ``httpx`` response as soon as its headers
  arrive (``cast_to=httpx2.Response, stream=True``); the body is read here, chunk by chunk,
  under ``wire.Guard``: every socket operation gets only the time left until the attempt's
  deadline, and the bytes read (on the wire and decoded, gzip included) are capped at the
  model's ``max_response_bytes`` (default 32 MiB). Past it the connection is dropped and the
  attempt is an ``api_error`` "response too large" (not retried).
* **Answers.** JSON bodies and server-sent events become the SDK's ``ChatCompletion`` /
  ``ChatCompletionChunk`` and then our ``Completion`` (``answers.py``), with tool calls,
  content parts, refusal, reasoning text, logprobs and usage; a stream asks for usage
  (``stream_options.include_usage``) unless the params say otherwise.
* **Proxies.** ``http_proxy``/``https_proxy``/``all_proxy`` (``http://``, ``https://``,
  ``socks5://``) and ``no_proxy`` (names, domain suffixes, ``host:port``, IP addresses and
  CIDR ranges, ``*``), read from the environment the item runs with. Loopback hosts never
  go through a proxy, so the built-in simulator works behind a corporate proxy.
* **Classification.** HTTP statuses by ``errors.classify_status``; timeouts, refused
  connections (naming the proxy when it is the proxy that refused), resets, TLS certificate
  errors, a stream cut short (``truncated``) and malformed answers each to their outcome.
  Every text quoting the server's bytes goes through ``scrub.scrub``.
"""

from __future__ import annotations

from typing import Any

from pytest_llmbench.providers.base import ChatRequest
from pytest_llmbench.providers.endpoint import (
    Endpoint,
    default_ssl_context,
    parse_endpoint,
    proxy_for,
)
from pytest_llmbench.records import Completion, ModelSpec

__all__ = ["Endpoint", "OpenAIProvider", "default_ssl_context", "parse_endpoint",
           "prepare_fork", "proxy_for", "warm_up"]


# --- the provider ---------------------------------------------------------------------------


class OpenAIProvider:
    """OpenAI-compatible ``/chat/completions`` through the ``openai`` SDK (the default)."""

    def endpoint(self, model: ModelSpec) -> str:
        return parse_endpoint(model.base_url).display

    def build_body(self, request: ChatRequest) -> dict[str, Any]:
        model = request.model
        merged = {**model.params, **request.params}
        body: dict[str, Any] = {"model": model.model, "messages": list(request.messages),
                                **merged, "stream": model.stream}
        if request.tools:
            body["tools"] = [dict(tool) for tool in request.tools]
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        if model.stream and "stream_options" not in merged:
            body["stream_options"] = {"include_usage": True}
        return {k: v for k, v in body.items() if v is not None}

    def send(self, request: ChatRequest, body: dict[str, Any], deadline: float) -> Completion:
        from pytest_llmbench.providers import openai_sdk  # the SDK: only where calls are made

        return openai_sdk.send(request, body, deadline)


def warm_up() -> None:
    """For the fork server, before it forks hosts: import the SDK and run one request path
    through it (``openai_sdk.warm_up``)."""
    from pytest_llmbench.providers import openai_sdk

    openai_sdk.warm_up()


def prepare_fork(provider: object) -> None:
    """For a process about to fork an item itself: import the SDK once here if the item
    will use it, rather than in every child (~0.8 s of CPU each)."""
    if provider is None or isinstance(provider, OpenAIProvider):
        from pytest_llmbench.providers import openai_sdk  # noqa: F401
