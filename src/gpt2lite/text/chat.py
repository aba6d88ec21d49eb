"""Chat messages to one prompt: the model's Jinja chat template, rendered as transformers and vLLM render it.

A chat template is the Jinja text a model's ``tokenizer_config.json`` (or its
``chat_template.jinja``) carries; it is rendered in jinja2's sandbox with
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension,
``raise_exception`` and ``strftime_now``, and the tokenizer's special tokens as
variables (``eos_token``, ``bos_token``). A model without one (GPT-2, DialoGPT)
gets ``DEFAULT_CHAT_TEMPLATE``: DialoGPT's convention, each turn's text followed
by ``<|endoftext|>``, with no role markers.

jinja2 comes with the ``serve`` extra (``pip install "gpt2lite[serve]"``).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

from gpt2lite.tokenizers.protocol import TokenizerProtocol

__all__ = ["DEFAULT_CHAT_TEMPLATE", "ChatTemplate", "message_text"]

DEFAULT_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{{ eos_token }}{% endfor %}"

ROLES = ("system", "developer", "user", "assistant", "tool")


def message_text(content: Any) -> str:
    """A message's text: a string, or a list's text parts (``{"type": "text", "text": ...}``) joined by newlines."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"message content parts must be text ({{'type': 'text', 'text': ...}}), got {kind!r}")
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
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
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

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages`` (``[{"role": ..., "content": ...}, ...]``), ready for the model to continue."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        plain = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise ValueError(f"message {i} must be an object with a 'role' and a 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"message {i} has role {m['role']!r}; roles are {list(ROLES)}")
            plain.append({**m, "content": message_text(m.get("content"))})
        try:
            return self._template.render(messages=plain, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except self._errors as exc:
            raise ValueError(f"the chat template refused these messages: {exc}") from None


def _raise(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)
