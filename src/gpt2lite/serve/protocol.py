"""The OpenAI (and vLLM) wire format: request bodies, their translation into options, and response pieces.

Request models refuse unknown fields (a 400 that names them) and check each
value; ``sampling_options`` turns a body into ``GenerationOptions``. Token
strings follow OpenAI's legacy convention: a token that is not whole UTF-8 is
written ``bytes:\\xNN...``, one ``\\xNN`` per byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpt2lite.errors import OptionError
from gpt2lite.generation.options import MAX_TOP_LOGPROBS, GenerationOptions
from gpt2lite.tokenizers.protocol import TokenizerProtocol

__all__ = [
    "MAX_LOGIT_BIAS",
    "MAX_STOP_STRINGS",
    "ChatCompletionRequest",
    "ChatMessage",
    "ClassifyRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "EmbeddingRequest",
    "LoadLoraAdapterRequest",
    "StreamOptions",
    "TokenizeRequest",
    "UnloadLoraAdapterRequest",
    "chat_logprobs",
    "check_chat_extras",
    "completion_logprobs",
    "constraint",
    "sampling_options",
    "token_text",
    "tool_calls_schema",
]

MAX_STOP_STRINGS = 64  # OpenAI takes 4; lm-evaluation-harness sends more, vLLM has no limit
MAX_LOGIT_BIAS = 300  # entries of logit_bias, as OpenAI allows


class _Body(BaseModel):
    # Strict: "2" is not an n, true is not a token id (a whole number is still a float).
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    """``stream_options``: a last chunk with the usage (``include_usage``)."""

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's name; accepted, not acted on


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's wrapper of a schema (``name``, ``schema``, ``strict``)."""

    model_config = ConfigDict(extra="allow", strict=True)

    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    """``response_format``: free text, any JSON object, or JSON valid under a schema."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama.cpp's and Ollama's spelling


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs``: one of a schema, a regex, a choice or a grammar."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _Sampling(_Body):
    """The sampling fields both endpoints share: OpenAI's, and the extras vLLM accepts."""

    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)  # 0 keeps only the most likely token: greedy
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # negative (llama.cpp's -1): no seed
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # gpt2lite's (and transformers'): more samplers, and generation past the context
    typical_p: float | None = Field(None, gt=0, le=1)
    epsilon_cutoff: float | None = Field(None, ge=0, lt=1)
    eta_cutoff: float | None = Field(None, ge=0, lt=1)
    context_shift: bool = False
    n_keep: int = Field(0, ge=0)
    # Structured output: OpenAI's response_format, vLLM's structured_outputs and guided_*, llama.cpp's json_schema
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    json_schema: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """The body of ``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=16)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class ChatMessage(BaseModel):
    """One message of a conversation (fields other than these are kept for the template)."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class FunctionSpec(BaseModel):
    """A tool's function: its name, and the JSON schema of its arguments."""

    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    """One of ``tools``: a function the model may call."""

    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Body):
    """The function a named ``tool_choice`` forces."""

    name: str


class NamedToolChoice(_Body):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: call this function."""

    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    """The body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    # OpenAI's fields that change nothing here: accepted and ignored (a tool call or another modality is refused).
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None


class TokenizeRequest(_Body):
    """The body of ``POST /tokenize`` (vLLM's): a prompt, or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class EmbeddingRequest(_Body):
    """The body of ``POST /v1/embeddings`` (OpenAI's), with the pooling as an extra."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    pooling: Literal["mean", "last"] = "mean"  # gpt2lite's: over the tokens, or the last token's state
    normalize: bool = True


class ClassifyRequest(_Body):
    """The body of ``POST /classify`` (vLLM's): one text or several."""

    model: str | None = None
    input: str | list[str]
    user: str | None = None


class DetokenizeRequest(_Body):
    """The body of ``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


class LoadLoraAdapterRequest(_Body):
    """The body of ``POST /v1/load_lora_adapter`` (vLLM's): a name for the adapter, and its PEFT directory."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False  # vLLM's: replace an adapter of that name (refused here: unload it first)


class UnloadLoraAdapterRequest(_Body):
    """The body of ``POST /v1/unload_lora_adapter`` (vLLM's)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; the name is what counts


def check_chat_extras(body: ChatCompletionRequest) -> None:
    """Refuse, by name, what a chat request asks that cannot be done: a tool choice without its tool, modalities."""
    names = [t.function.name for t in body.tools or []]
    if len(set(names)) != len(names):
        raise OptionError("tools", "tools: each function needs a name of its own")
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise OptionError("tool_choice", f"tool_choice names {choice.function.name!r}, which is not among the "
                                         f"tools {names}")
    if choice == "required" and not names:
        raise OptionError("tool_choice", "tool_choice 'required' needs tools to choose from")
    if body.modalities and body.modalities != ["text"]:
        raise OptionError("modalities", f"modalities: only ['text'] is produced, got {body.modalities}")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """``stop`` as a list of non-empty strings; too many or empty ones are an ``OptionError``."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise OptionError("stop", f"stop takes up to {MAX_STOP_STRINGS} non-empty strings")
    return stops


MAX_PARALLEL_TOOL_CALLS = 4  # calls one reply may make under tool_choice "required"


def tool_calls_schema(body: _Sampling) -> tuple[str | None, dict[str, Any]] | None:
    """(the forced function's name, or None for any) and the JSON schema a tool-calling reply is written in.

    A named ``tool_choice`` makes the reply that function's arguments; ``"required"``
    a list of ``{"name", "arguments"}`` calls of the tools (one without
    ``parallel_tool_calls``). ``"auto"`` and ``"none"`` leave the reply free text:
    GPT-2 has no format of its own for choosing to call a tool.
    """
    tools = getattr(body, "tools", None) or []
    choice = getattr(body, "tool_choice", None)

    def parameters(tool: Tool) -> dict[str, Any]:
        return tool.function.parameters or {"type": "object", "properties": {}, "additionalProperties": False}

    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return tool.function.name, parameters(tool)
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": parameters(t)},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        most = 1 if body.parallel_tool_calls is False else MAX_PARALLEL_TOOL_CALLS
        return None, {"type": "array", "items": {"anyOf": calls}, "minItems": 1, "maxItems": most}
    return None


def constraint(body: _Sampling) -> tuple[str, dict[str, Any]] | None:
    """(the request's field, ``GenerationOptions``' fields) of its structured-output request, or None.

    Every spelling clients send is read: OpenAI's ``response_format``, vLLM's
    ``structured_outputs`` and ``guided_*``, llama.cpp's ``json_schema``; two at once
    are refused naming the second.
    """
    found: list[tuple[str, dict[str, Any]]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_schema": {"type": "object"}}))
    elif rf is not None and rf.type == "json_schema":
        schema = rf.json_schema.schema_ if rf.json_schema is not None else rf.schema_
        if schema is None:
            raise OptionError("response_format", "response_format of type json_schema needs its schema "
                                                 "(json_schema.schema)")
        found.append(("response_format", {"json_schema": schema}))
    tools = tool_calls_schema(body)
    if tools is not None:
        found.append(("tool_choice", {"json_schema": tools[1]}))
    so = body.structured_outputs
    if so is not None:
        for key, name in (("json_", "json_schema"), ("regex", "regex"), ("choice", "choice"), ("grammar", "grammar")):
            if getattr(so, key) is not None:
                found.append((f"structured_outputs.{key.rstrip('_')}", {name: getattr(so, key)}))
    for field, name in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                        ("guided_grammar", "grammar"), ("json_schema", "json_schema")):
        if getattr(body, field) is not None:
            found.append((field, {name: getattr(body, field)}))
    if len(found) > 1:
        raise OptionError(found[1][0], f"give one structured-output constraint, not {found[0][0]} and {found[1][0]}")
    if found and found[0][1].get("choice") == []:
        raise OptionError(found[0][0], f"{found[0][0]} needs at least one string to choose from")
    return found[0] if found else None


def sampling_options(body: _Sampling, *, max_tokens: int, eos: int, vocab: int, top_logprobs: int,
                     structured: Mapping[str, Any] | None = None) -> GenerationOptions:
    """The ``GenerationOptions`` a request body asks for (the seed of choice 0; add ``i`` for choice ``i``).

    ``structured``: the constraint fields ``constraint(body)`` found, read once by the caller.
    """
    bias: dict[int, float] = {}
    if body.logit_bias:
        if len(body.logit_bias) > MAX_LOGIT_BIAS:
            raise OptionError("logit_bias", f"logit_bias names {len(body.logit_bias)} tokens; at most "
                                            f"{MAX_LOGIT_BIAS} are allowed")
        try:
            bias = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError:
            raise OptionError("logit_bias", "logit_bias keys must be token ids") from None
        if not all(0 <= k < vocab for k in bias):
            raise OptionError("logit_bias", f"logit_bias names a token outside the vocabulary (0..{vocab - 1})")
    stop_ids = [[t] for t in body.stop_token_ids or []]
    if any(not 0 <= t < vocab for (t,) in stop_ids):
        raise OptionError("stop_token_ids", f"stop_token_ids holds an id outside the vocabulary (0..{vocab - 1})")
    given = {
        "temperature": 0 if body.top_p == 0 else body.temperature, "top_p": body.top_p or None,
        "min_p": body.min_p, "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
        "seed": body.seed if body.seed is None or body.seed >= 0 else None,
        "top_k": None if body.top_k in (None, -1) else body.top_k,  # vLLM writes "off" as -1
        "typical_p": body.typical_p, "epsilon_cutoff": body.epsilon_cutoff, "eta_cutoff": body.eta_cutoff,
    }
    return GenerationOptions(
        **(structured or {}),
        max_new_tokens=max_tokens, min_new_tokens=min(body.min_tokens, max_tokens), logit_bias=bias,
        stop=stop_ids, ignore_eos=body.ignore_eos, eos_token_id=eos, top_logprobs=top_logprobs,
        context_shift=body.context_shift, n_keep=body.n_keep,
        **{k: v for k, v in given.items() if v is not None},
    )


def token_text(tokenizer: TokenizerProtocol, token: int) -> str:
    """A token as OpenAI writes it: its text, or ``bytes:\\xNN...`` when its bytes are not whole UTF-8."""
    data = tokenizer.decode_token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _top_dict(tokenizer: TokenizerProtocol, token: int, logprob: float,
              top: Sequence[tuple[int, float]]) -> dict[str, float]:
    """The alternatives at one position, the chosen token among them (up to k + 1 entries, as OpenAI and vLLM)."""
    out = {token_text(tokenizer, i): v for i, v in top}
    out.setdefault(token_text(tokenizer, token), logprob)
    return out


def completion_logprobs(
    tokenizer: TokenizerProtocol, tokens: Sequence[tuple[int, float | None, Sequence[tuple[int, float]] | None]],
    offsets: Sequence[int],
) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs`` object: ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``.

    Each token comes as (id, log-probability or None, top alternatives or None);
    ``offsets`` gives where each token's text begins in the choice's text.
    """
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": list(offsets)}
    for token, logprob, top in tokens:
        out["tokens"].append(token_text(tokenizer, token))
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(None if logprob is None or top is None else
                                   _top_dict(tokenizer, token, logprob, top))
    return out


def chat_logprobs(tokenizer: TokenizerProtocol, tokens: Sequence[tuple[int, float, Sequence[tuple[int, float]]]],
                  ) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token), "logprob": logprob,
                "bytes": list(tokenizer.decode_token_bytes(token))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top in tokens],
            "refusal": None}
