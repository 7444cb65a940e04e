"""What plain Python tests get through fixtures: a model client and resource leases."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pytest_llmbench.config import deadline_overrides
from pytest_llmbench.errors import APIError
from pytest_llmbench.records import Completion, Deadlines, Message, ModelSpec

if TYPE_CHECKING:
    from pytest_llmbench.coord.lease import Lease
    from pytest_llmbench.session.export import Call
    from pytest_llmbench.session.run import LLMBenchSession


class LLMClient:
    """``llm.chat(...)``: the same API layer (timeouts, retries, Retry-After) and the same
    machine-wide rate limits (the session's shared limiter) as suite items."""

    def __init__(
        self, session: LLMBenchSession, label: str, overrides: Mapping[str, Any],
        *, calls: list[Call] | None = None,
    ) -> None:
        self._session = session
        self._calls = calls
        """Where each call is recorded (the test's record), or None."""
        self._label = label
        self._overrides = deadline_overrides(
            {k: v for k, v in overrides.items() if k != "model"}, f"{label}: llmbench marker"
        )
        self._default_model = overrides.get("model")

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        return self._session.settings.models

    @property
    def deadlines(self) -> Deadlines:
        values = dict(self._overrides)
        if "api_retries" in values:
            values["api_retries"] = int(values["api_retries"])
        return self._session.settings.deadlines.replace(**values)

    def model(self, name: str | None = None) -> ModelSpec:
        name = name or self._default_model
        if name is None:
            return self.models[0]
        for spec in self.models:
            if spec.name == name:
                return spec
        known = ", ".join(m.name for m in self.models)
        raise LookupError(f"model {name!r} is not selected for this run; selected: {known}")

    def chat(
        self, prompt: str | Sequence[Message], *, model: str | None = None, system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: Any = None,
        **params: Any,
    ) -> Completion:
        """One chat call. ``prompt``: a user message or a whole conversation (which may hold
        assistant ``tool_calls`` and ``tool`` messages); ``tools``: OpenAI tool dicts
        (``{"type": "function", "function": {"name", "description", "parameters"}}``);
        the answer's ``tool_calls`` are the calls the model made, and
        ``answer.assistant_message()`` is what to append before the tool results."""
        from pytest_llmbench.providers import api

        spec = self.model(model)
        messages: list[Message] = []
        if system:
            messages.append({"role": "system", "content": system})
        if isinstance(prompt, str):
            messages.append({"role": "user", "content": prompt})
        else:
            messages.extend(dict(m) for m in prompt)
        record = None
        if self._calls is not None:
            import time

            from pytest_llmbench.session.export import Call

            record = Call([dict(m) for m in messages], spec.name, time.time())
            self._calls.append(record)
        try:
            completion = api.chat(
                self._session.resolved_model(spec),
                messages,
                params=params,
                tools=tools,
                tool_choice=tool_choice,
                deadlines=self.deadlines,
                api_key=self._session.settings.api_key(spec),
                label=self._label,
                limiter=self._session.limiter,
                provider=self._session.provider_for(spec),
                request_hooks=self._session.request_hooks,
                breaker=self._session.breaker,
                fallback_keys=tuple(self._session.settings.api_key(f)
                                    for f in spec.fallbacks),
            )
        except APIError as exc:
            if record is not None:
                record.error, record.error_class = str(exc), exc.error_class
            raise
        if record is not None:
            record.completion = completion
        return completion


def lease_factory(
    session: LLMBenchSession, held: list[Lease] | None = None
) -> Callable[..., Lease]:
    """``llm_lease("sandbox", timeout=10)`` -> a context-managed lease on that pool; each
    lease is also appended to ``held``."""

    def acquire(pool: str, timeout: float | None = None, *, label: str = "") -> Lease:
        # Held by this pytest process for a plain test: never killed from outside, the
        # lease's own guard interrupts the test at lease_max (coord/lease.py).
        lease = session.leases.acquire(pool, timeout, label=label, in_process=True)
        if held is not None:
            held.append(lease)
        return lease

    return acquire
