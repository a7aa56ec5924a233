"""Request models, the OpenAI error shape, and request -> engine arguments.

Contract:
* ``ChatRequest`` / ``CompletionRequest`` are the pydantic bodies of
  ``POST /v1/chat/completions`` and ``POST /v1/completions``. Unknown fields
  are ignored (clients send metadata such as ``user``); known OpenAI fields
  that would change the output but are not supported (``n`` != 1,
  ``logprobs``, ``tools``, penalties, ``logit_bias``, a non-text
  ``response_format``, ``echo``, ``suffix``, ...) are refused with
  :class:`ApiError` (HTTP 400), never silently dropped.
* :func:`sampling_args` turns a request into the keyword arguments of
  ``Engine.stream_generate`` (``max_tokens`` checked against the server's
  limit); :func:`chat_prompt` / :func:`completion_prompt` give the engine's
  prompt (chat messages, a string or token ids).
* :func:`error_body` is OpenAI's error JSON:
  ``{"error": {"message", "type", "param", "code"}}``.

Nothing here touches MLX or the file system: a request can only select
sampling settings and text, never a model or a path.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# OpenAI allows 4 stop sequences; editors (Continue's autocomplete) send more.
MAX_STOP = 32


class ApiError(Exception):
    """An error answered with OpenAI's error JSON and ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# -- request bodies --------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, refusal, ... carry no output-changing meaning here
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: Optional[list[Any]] = None


class _Common(BaseModel):
    """Fields shared by both endpoints. ``top_k`` / ``min_p`` are the usual
    local-server extensions (the engine samples them losslessly)."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    # Refused unless neutral (they would change the output):
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    best_of: Optional[int] = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict, None] = None
    functions: Optional[list[Any]] = None
    function_call: Union[str, dict, None] = None
    response_format: Optional[dict] = None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None


# -- request -> engine ---------------------------------------------------------------


def _refuse_unsupported(req: _Common):
    """400 for fields whose effect the server cannot honour."""
    if req.n not in (None, 1):
        raise bad_request("n must be 1: this server returns one choice per request", "n")
    if req.best_of not in (None, 1):
        raise bad_request("best_of is not supported (one choice per request)", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported (it would change the target's "
                              "distribution per draft-tree node); leave it at 0", name)
    if req.repetition_penalty not in (None, 1, 1.0):
        raise bad_request("repetition_penalty is not supported with speculative decoding", "repetition_penalty")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    if isinstance(req, ChatRequest):
        if req.logprobs or req.top_logprobs:
            raise bad_request("logprobs are not supported", "logprobs")
        if req.tools or req.functions:
            raise bad_request("tools / function calling are not supported", "tools")
        if req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
            raise bad_request("tool_choice is not supported", "tool_choice")
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise bad_request(f"response_format {fmt!r} is not supported (only 'text')", "response_format")
    else:
        if req.logprobs is not None:
            raise bad_request("logprobs are not supported", "logprobs")
        if req.echo:
            raise bad_request("echo is not supported", "echo")
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")


def _stops(stop) -> list:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise bad_request(f"at most {MAX_STOP} stop sequences are allowed", "stop")
    if any(s == "" for s in stops):
        raise bad_request("stop sequences must not be empty", "stop")
    return stops


def sampling_args(req: _Common, max_tokens_limit: int) -> dict:
    """Keyword arguments for ``Engine.stream_generate`` (ApiError 400 when refused).

    ``max_tokens`` (or ``max_completion_tokens``) must be 1..``max_tokens_limit``;
    omitted, it is the limit (the engine also stops at the context limit)."""
    _refuse_unsupported(req)
    mt = getattr(req, "max_completion_tokens", None)
    name = "max_completion_tokens" if mt is not None else "max_tokens"
    mt = mt if mt is not None else req.max_tokens
    if mt is None:
        mt = max_tokens_limit
    elif mt < 1:
        raise bad_request(f"{name} must be at least 1, got {mt}", name)
    elif mt > max_tokens_limit:
        raise bad_request(f"{name} is too large: {mt}; this server allows at most "
                          f"{max_tokens_limit} (--max-tokens-limit)", name)
    return dict(
        max_tokens=int(mt),
        temp=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=int(req.top_k or 0),
        min_p=float(req.min_p or 0.0),
        stop=_stops(req.stop),
        seed=req.seed,
    )


def _text(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise bad_request(f"messages[{i}]: content part type {part.type!r} is not supported "
                              "(text only)", f"messages.{i}.content")
        parts.append(part.text)
    return "".join(parts)


def chat_prompt(req: ChatRequest) -> list:
    """Chat messages for the engine's chat template (``developer`` -> ``system``,
    which every template knows)."""
    msgs = []
    for i, m in enumerate(req.messages):
        if m.role in ("tool", "function") or m.tool_calls:
            raise bad_request(f"messages[{i}]: tool messages are not supported", f"messages.{i}.role")
        role = "system" if m.role == "developer" else m.role
        msgs.append({"role": role, "content": _text(m.content, i)})
    return msgs


def completion_prompt(req: CompletionRequest):
    """A string or a token-id list (one prompt: several would be n > 1)."""
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise bad_request("exactly one prompt per request is supported", "prompt")
        p = p[0]
    if isinstance(p, list):
        if not p:
            raise bad_request("prompt is empty", "prompt")
        if any(t < 0 for t in p):
            raise bad_request("token ids must be non-negative", "prompt")
    elif p == "":
        raise bad_request("prompt is empty", "prompt")
    return p
