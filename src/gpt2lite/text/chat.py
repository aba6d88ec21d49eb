"""Chat messages to one prompt: the model's Jinja chat template, rendered as transformers and vLLM render it.

A chat template is the Jinja text a model's ``tokenizer_config.json`` (or its
``chat_template.jinja``) carries; it is rendered in jinja2's sandbox with
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension,
``raise_exception`` and ``strftime_now``, and the tokenizer's special tokens as
variables (``eos_token``, ``bos_token``). A model without one (GPT-2, DialoGPT)
gets ``DEFAULT_CHAT_TEMPLATE``: DialoGPT's convention, each turn's text followed
by ``<|endoftext|>``, with no role markers.

A template is data from a model folder, so its rendering has a budget: at most
``MAX_RENDER_SECONDS`` of time (checked at each line of the template's code, so
that an endless loop ends) and ``MAX_RENDER_CHARS`` of output, and no string or
list repeated past that. A template over budget (endless recursion and memory included)
raises ``TemplateBudgetError``; one that fails in a way jinja does not report
as its own (an ``include`` with no loader) a ``ValueError`` that says so.

jinja2 comes with the ``serve`` extra (``pip install "gpt2lite[serve]"``).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from gpt2lite.tokenizers.protocol import TokenizerProtocol

__all__ = ["DEFAULT_CHAT_TEMPLATE", "MAX_RENDER_CHARS", "MAX_RENDER_SECONDS", "ChatTemplate", "TemplateBudgetError",
           "TemplateRefusal", "message_text"]

DEFAULT_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{{ eos_token }}{% endfor %}"

ROLES = ("system", "developer", "user", "assistant", "tool")

MAX_RENDER_SECONDS = 2.0  # a real template renders a long conversation in milliseconds
MAX_RENDER_CHARS = 4 * 2**20  # more than any prompt a GPT-2 context holds


class TemplateRefusal(ValueError):
    """A chat template refused the messages (``raise_exception``, or another of jinja's own errors)."""


class TemplateBudgetError(ValueError):
    """A chat template went past its rendering budget: time, output, ranges, recursion or memory."""


class _Budget:
    """The time one rendering has left."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"the chat template took more than {MAX_RENDER_SECONDS} s to render")


def _watch(budget: _Budget) -> Any:
    """A trace function that checks the deadline at each line a template's own code runs (loops included).

    Only frames of compiled templates are followed, so the rest of the
    rendering thread runs untraced; the previous trace function comes back after.
    """

    def line(frame: Any, event: str, arg: Any) -> Any:
        budget.tick()
        return line

    def call(frame: Any, event: str, arg: Any) -> Any:
        return line if frame.f_code.co_filename == "<template>" else None

    return call


def _checked_binop(operator: str, left: Any, right: Any) -> Any:
    """``*`` and ``**`` of a template, refused where the result would pass the output budget."""
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_RENDER_CHARS:
                raise TemplateBudgetError(f"the chat template repeats a value past {MAX_RENDER_CHARS} items")
        return left * right
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 \
            and right * abs(left).bit_length() > 8 * MAX_RENDER_CHARS:
        raise TemplateBudgetError("the chat template raises a number to a power past its budget")
    return left**right


def message_text(content: Any) -> str:
    """A message's text: a string, or a list's text parts (``{"type": "text", "text": ...}``) joined by newlines."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"message content parts must be text ({{'type': 'text', 'text': ...}}), got {kind!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"a text part of a message must hold its text as a string ('text'), got "
                                 f"{part.get('text')!r:.40}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


class ChatTemplate:
    """A compiled chat template: ``render(messages)`` gives the prompt text.

    >>> ChatTemplate(None, {"eos_token": "<|endoftext|>"}).render([{"role": "user", "content": "Hi"}])
    'Hi<|endoftext|>'
    """

    def __init__(self, source: str | None, special_tokens: Mapping[str, str] | None = None) -> None:
        """Compile ``source`` (None: ``DEFAULT_CHAT_TEMPLATE``); ``special_tokens`` maps ``eos_token`` etc. to text."""
        try:
            import jinja2
            import jinja2.ext
            import jinja2.sandbox
        except ImportError:
            raise ImportError("chat templates need jinja2: pip install 'gpt2lite[serve]'") from None
        self.source = source if source is not None else DEFAULT_CHAT_TEMPLATE
        self.is_default = source is None
        self.special_tokens = dict(special_tokens or {})
        class Environment(jinja2.sandbox.ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset({"*", "**"})

            def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
                if operator in ("*", "**"):
                    return _checked_binop(operator, left, right)
                return super().call_binop(context, operator, left, right)

        env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self._errors = (jinja2.TemplateError,)
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template does not compile: {exc}") from None

    @classmethod
    def for_tokenizer(cls, source: str | None, tokenizer: TokenizerProtocol) -> ChatTemplate:
        """``source`` compiled with the tokenizer's end token as ``eos_token`` and ``bos_token`` (GPT-2 has one)."""
        eos = tokenizer.decode([tokenizer.eot_token])
        return cls(source, {"eos_token": eos, "bos_token": eos})

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt for ``messages`` (``[{"role": ..., "content": ...}, ...]``), ready for the model to continue.

        ``tools`` (OpenAI's ``[{"type": "function", "function": {...}}]``) reach the
        template as ``tools``, as transformers hands them over.
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        plain = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise ValueError(f"message {i} must be an object with a 'role' and a 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"message {i} has role {m['role']!r}; roles are {list(ROLES)}")
            plain.append({**m, "content": message_text(m.get("content"))})
        budget = _Budget()
        previous = sys.gettrace()
        sys.settrace(_watch(budget))  # this thread only: a template's endless loop ends at the deadline
        try:
            pieces, size = [], 0
            for piece in self._template.generate(messages=plain, add_generation_prompt=add_generation_prompt,
                                                 tools=list(tools) if tools else None, **self.special_tokens):
                pieces.append(piece)
                size += len(piece)
                if size > MAX_RENDER_CHARS:
                    raise TemplateBudgetError(f"the chat template wrote more than {MAX_RENDER_CHARS} characters")
                budget.tick()
            return "".join(pieces)
        except TemplateBudgetError:
            raise
        except self._errors as exc:
            raise TemplateRefusal(f"the chat template refused these messages: {exc}") from None
        except RecursionError:
            raise TemplateBudgetError("the chat template recurses without end") from None
        except MemoryError:
            raise TemplateBudgetError("the chat template ran out of memory") from None
        except (TypeError, OverflowError, AttributeError, KeyError, IndexError, ZeroDivisionError,
                ValueError) as exc:  # an include with no loader, the sandbox's range limit, a template's own bug
            raise ValueError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
        finally:
            sys.settrace(previous)

    def check(self) -> None:
        """Render a one-message conversation once, so that a template that fails or runs away is found at load.

        A template that refuses that conversation itself (``raise_exception``,
        or another of jinja's own errors) passes: other conversations may suit it.
        """
        try:
            self.render([{"role": "user", "content": "Hello"}])
        except TemplateRefusal:
            pass  # raise_exception, or another of jinja's own errors: a refusal of this conversation
        except ValueError as exc:
            raise type(exc)(f"{exc} (on a one-message conversation, tried at load)") from None


def _raise(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)
