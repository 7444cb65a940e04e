"""Plain data passed along the chain suite -> item -> engine -> store -> report.

Everything here is immutable (or treated so), JSON-serialisable through ``to_dict`` /
``from_dict`` and picklable, because records cross process boundaries (forked item
children, xdist workers) and are written to the result store.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from enum import Enum
from typing import Any

Message = dict[str, Any]
"""One chat message as the OpenAI chat API takes it: ``{"role": ..., "content": ...}``;
``content`` is a string or a list of content parts, an assistant message may carry
``tool_calls`` and a ``tool`` message its ``tool_call_id``."""

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - exercised on Python 3.10 only
    class StrEnum(str, Enum):
        """``enum.StrEnum`` (3.11+): members are strings, ``str()`` is the value."""

        def __str__(self) -> str:
            return str(self.value)


class Status(StrEnum):
    """An item's status as stored and reported: the model was right, wrong, or could not
    be judged (``error``: ``ItemResult.error_class`` says why)."""

    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"


class Source(StrEnum):
    """Where a reported result came from in this run (JUnit ``source``, run manifests)."""

    RAN = "ran"
    CACHED = "cached"
    RESCORED = "rescored"


# Records hold the plain values (``Status.PASSED.value``...): they are marshalled into the
# store's index, which takes exact ``str`` only, and compared with strings read back from
# JSON. The enums are the vocabulary; these are its values as stored.
PASSED: str = Status.PASSED.value
FAILED: str = Status.FAILED.value
ERROR: str = Status.ERROR.value


@dataclass(frozen=True, kw_only=True)
class Deadlines:
    """The three deadline layers of DESIGN.md section 3 (seconds)."""

    api_timeout: float = 30.0
    """One HTTP attempt (connect + full answer)."""
    api_retries: int = 2
    """Retries on top of the first attempt."""
    task_timeout: float = 600.0
    """The whole item: every turn, call and the scoring; enforced by killing its process."""
    lease_max: float = 900.0
    """Maximum occupation of one lease on a shared resource."""

    def replace(self, **changes: Any) -> Deadlines:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model endpoint as configured (never holds the API key itself)."""

    name: str
    """Display name, used in node ids and summaries."""
    model: str
    """Model id sent to the endpoint."""
    base_url: str
    """Base URL ending in ``/v1``; the literal ``sim`` means the built-in simulator."""
    api_key_env: str | None = None
    """Name of the environment variable that holds the key (the key is never stored)."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Default sampling parameters (temperature, max_tokens, ...)."""
    stream: bool = False
    rpm: float | None = None
    tpm: float | None = None
    max_connections: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra non-secret headers (e.g. ``api-version`` for Azure is a query; see docs)."""
    api_version: str | None = None
    """Azure OpenAI's ``api-version``: set, the endpoint is reached with ``AzureOpenAI``."""
    max_response_bytes: int = 32 * 1024 * 1024
    """Cap on the bytes of one answer (and on the text kept of a streamed one)."""
    max_retry_after: float = 60.0
    """A server asking to wait longer than this (Retry-After) is treated as down."""
    price_input: float | None = None
    """USD per 1M prompt tokens, for the cost shown in progress and reports (optional)."""
    price_output: float | None = None
    """USD per 1M completion tokens (optional)."""
    fallbacks: tuple[ModelSpec, ...] = ()
    """Other endpoints serving the same model, tried in order when this endpoint's circuit
    breaker is open (their own fallbacks are not followed)."""

    @property
    def simulated(self) -> bool:
        return self.base_url == "sim"


@dataclass(frozen=True, kw_only=True)
class ScorerSpec:
    """Which scorer judges an answer, with its options and pass threshold."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    threshold: float = 1.0


@dataclass(frozen=True, kw_only=True)
class ToolSpec:
    """One tool a suite offers the model (docs/agents.md): what the model is told, and how
    the item process runs it: a ``module:function`` callable or a ``command``."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    """The JSON schema of the arguments (an ``object`` schema)."""
    function: str | None = None
    """``module:function`` called in the item process with the arguments as keywords."""
    command: tuple[str, ...] = ()
    """argv of a subprocess of the item: the arguments as JSON on stdin, the result on stdout
    (``{python}`` is this interpreter, ``{suite_dir}`` the suite file's directory)."""
    timeout: float = 10.0
    """Seconds one call may take (also capped by the task deadline)."""
    base_dir: str = ""
    """Absolute directory of the suite file: the command's working directory, and where a
    ``module:function`` is looked for when it is not importable as it is."""

    def openai_tool(self) -> dict[str, Any]:
        """The tool as the chat API takes it (``tools=[...]``)."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": to_jsonable(self.parameters) or {"type": "object", "properties": {}}}}


@dataclass(frozen=True, kw_only=True)
class AgentLimits:
    """Limits of an item's agent loop (``agent`` table of a suite; docs/agents.md)."""

    max_turns: int = 10
    """Model calls in the item, at most; one more is error class ``max_turns``."""
    max_tool_calls: int = 50
    """Tool calls executed in the item, at most (error class ``max_tool_calls``)."""
    token_budget: int | None = None
    """Prompt + completion tokens over all calls; exceeding it is ``budget_exceeded``."""
    loop_repeats: int = 3
    """The same call (name + canonical arguments), or the same assistant message with tool
    calls, seen this many times ends the item with error class ``loop``."""
    result_chars: int = 4000
    """A tool result longer than this is cut (for the model and in the transcript)."""
    expect_error: str | None = None
    """An error class this item is meant to end with (a demonstration, e.g. ``loop``): it
    then passes, and fails when it ends any other way."""


@dataclass(frozen=True, kw_only=True)
class Case:
    """One prompt x instance of a suite, rendered and validated; model-independent."""

    suite_path: str
    """Suite file path relative to the rootdir (posix separators)."""
    suite_name: str
    prompt_id: str
    instance_id: str
    turns: tuple[tuple[Message, ...], ...]
    """Rendered messages per turn. Turn 0 holds the system prompt and the first user
    message(s); each later turn holds the user message(s) appended after the model's
    previous answer."""
    expected: Any
    scorer: ScorerSpec
    params: Mapping[str, Any] = field(default_factory=dict)
    """Sampling parameters from the suite/prompt/instance, over the model's defaults."""
    repeats: int = 1
    deadlines: Mapping[str, float] = field(default_factory=dict)
    """Per-suite/prompt/instance deadline overrides (keys of ``Deadlines``)."""
    tags: tuple[str, ...] = ()
    line: int = 0
    """Best-effort line of the prompt in the suite file, for reports."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Scorer-specific data of the instance (e.g. code tests), passed to the scorer."""
    tools: tuple[ToolSpec, ...] = ()
    """Tools the model may call; with tools (or ``agent``) the item runs the agent loop."""
    agent: AgentLimits | None = None
    """Limits of the agent loop; ``None`` without tools and without an ``agent`` table."""

    @property
    def case_id(self) -> str:
        return f"{self.prompt_id}[{self.instance_id}]"


@dataclass(frozen=True, kw_only=True)
class ToolCall:
    """One tool call of an assistant answer, as the model sent it."""

    id: str
    name: str
    arguments: str
    """The arguments as the model sent them: JSON text, not trusted to be valid."""


@dataclass(frozen=True, kw_only=True)
class Completion:
    """One answer received from the endpoint (the provider's answer model)."""

    text: str
    """The answer's text; content parts of type ``text`` joined when the server sent parts."""
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: float = 0.0
    model: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    content_parts: tuple[Mapping[str, Any], ...] = ()
    """The content as a list of parts, when the server sent a list (else empty)."""
    refusal: str | None = None
    reasoning: str | None = None
    """Reasoning text when the server sends it (``reasoning_content`` / ``reasoning``)."""
    logprobs: Any = None
    """Passed through as the server sent it (JSON types)."""
    endpoint: str = ""
    """The name of the model config that answered (a fallback's, when the model's endpoint
    was down)."""

    def assistant_message(self) -> Message:
        """The message to append to the conversation for this answer."""
        msg: Message = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return msg


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One HTTP attempt of one call, as recorded for the item's result."""

    turn: int
    number: int
    """1-based attempt number within the call."""
    started: float
    """Seconds since the item started."""
    duration: float
    outcome: str
    """``ok`` or an error class (``timeout``, ``rate_limited``, ``server_error``...)."""
    status: int | None = None
    error: str = ""
    wait: float = 0.0
    """Seconds slept after this attempt before the next one."""


@dataclass(frozen=True)
class Score:
    """A scorer's judgement: ``value`` in [0, 1] and a short human explanation.

    ``Score(0.5, "half the fields match")`` works: value and explanation may be positional
    (the one record scorer authors build by hand); ``details`` is keyword-only."""

    value: float
    explanation: str = ""
    _: KW_ONLY
    details: Mapping[str, Any] = field(default_factory=dict)


_SCALARS = (str, int, float, bool, type(None))
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _to_jsonable(value: Any) -> Any:
    # Scalars first, and a dataclass's field names cached per type: every result is turned
    # into a dict once or twice per item in the item's process and again for the export,
    # and ``dataclasses.is_dataclass``/``fields`` on every value cost ~0.3 ms per result.
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        return {k if type(k) is str else str(k): _to_jsonable(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [_to_jsonable(v) for v in value]
    names = _FIELD_NAMES.get(kind)
    if names is None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _FIELD_NAMES[kind] = tuple(f.name for f in dataclasses.fields(value))
    if names is not None:
        return {name: _to_jsonable(getattr(value, name)) for name in names}
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


def to_jsonable(value: Any) -> Any:
    """Dataclasses, mappings and sequences to plain JSON types (tuples become lists)."""
    return _to_jsonable(value)


@dataclass(kw_only=True)
class ItemResult:
    """Everything known about one finished (or killed) item; what the store holds.

    ``status`` is ``passed`` / ``failed`` (the model was wrong) / ``error`` (we could not
    judge: ``error_class`` says why, e.g. ``api_error``, ``task_timeout``).
    """

    key: str
    """Content hash of everything that determines the result (see ``store.item_key``)."""
    identity: dict[str, Any]
    """suite, prompt, instance, model, repeat, nodeid."""
    status: str
    error_class: str | None = None
    error: str = ""
    deadline_layer: str | None = None
    """``api``, ``task`` or ``lease`` when a deadline fired."""
    messages: list[Message] = field(default_factory=list)
    """The whole conversation sent, including the model's earlier-turn answers."""
    completions: list[dict[str, Any]] = field(default_factory=list)
    answer: str | None = None
    expected: Any = None
    score: float | None = None
    threshold: float = 1.0
    explanation: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = 0.0
    """Unix time the item started."""
    elapsed: float = 0.0
    latency: float = 0.0
    """Sum of the successful completions' latencies."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    turn: int = 0
    """Turn reached (0-based) when the item ended; for an agent item, its model call."""
    transcript: list[dict[str, Any]] = field(default_factory=list)
    """Agent items: what happened, in order: messages sent, answers (with tool calls, timing
    and tokens), tool results (cut to ``AgentLimits.result_chars``) and why the loop stopped.
    Empty for plain items (``messages`` and ``completions`` hold theirs)."""
    cached: bool = False
    """Set when reported from the store rather than run now (not part of the record)."""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = to_jsonable(self)
        data.pop("cached", None)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ItemResult:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown result fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True, kw_only=True)
class ScoreRequest:
    """What a scorer gets: the model's final answer and the instance's expectations."""

    answer: str
    expected: Any
    options: Mapping[str, Any] = field(default_factory=dict)
    """The scorer's options from the suite (e.g. ``tolerance``)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Scorer-specific instance data (``Case.extra``), e.g. code tests."""
    identity: Mapping[str, Any] = field(default_factory=dict)
    """suite / prompt / instance / model / repeat / nodeid of the item being scored."""
    deadline: float | None = None
    """The item's task deadline (absolute ``time.monotonic()``), or None; a scorer that runs
    programs (the ``code`` scorer) keeps its runs inside it."""
