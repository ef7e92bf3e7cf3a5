"""Chat messages -> prompt text, for the chat endpoints.

A tokenizer that ships a `chat_template` renders the conversation itself (with the
generation prompt for the assistant's turn). Without one, the simple format is used: one line
per message, the role capitalised, then an open assistant line for the answer:

    System: You are terse.
    User: What is 2+2?
    Assistant:
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from antiphon.deploy.api import ChatMessage


def render_simple(messages: Sequence[ChatMessage]) -> str:
    """The documented fallback format (see the module docstring)."""
    lines = [f"{m.role.capitalize()}: {m.text()}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def render_chat(messages: Sequence[ChatMessage], tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The prompt text for `messages`: the tokenizer's chat template if it has one."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
    return render_simple(messages)
