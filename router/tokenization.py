"""Tokenizing once, in the router, so both workers see identical token ids."""

from __future__ import annotations

import asyncio

from baton.errors import ClientError


class Tokenizer:
    def __init__(self, model_path: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(model_path)

    def _chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # template errors are the caller's messages' fault
            raise ClientError(f"cannot apply the chat template: {exc}", param="messages") from exc
        # The template already holds the special tokens.
        return self._tok(text, add_special_tokens=False).input_ids

    def _text(self, prompt: str) -> list[int]:
        return self._tok(prompt).input_ids

    async def chat(self, messages: list[dict[str, str]]) -> list[int]:
        return await asyncio.to_thread(self._chat, messages)

    async def text(self, prompt: str) -> list[int]:
        return await asyncio.to_thread(self._text, prompt)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)
