"""The bounds of a search query, checked before anything heavy is imported or loaded (the CLI answers a bad argument
at once; the service answers 400)."""

from __future__ import annotations

from vclr.config import VclrError

MAX_QUERY_CHARS = 1000
MAX_K = 1000


def check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise VclrError(f"k must be an integer from 1 to {MAX_K}, got {k}")


def check_text_query(text: str | None) -> str:
    text = (text or "").strip()
    if not text:
        raise VclrError("the text query is empty: say what to look for, e.g. 'a red circle'")
    if len(text) > MAX_QUERY_CHARS:
        raise VclrError(f"the text query has {len(text)} characters; the limit is {MAX_QUERY_CHARS}")
    return text
