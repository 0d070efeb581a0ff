"""The self-chat prompts: the paper's template (Appendix A) verbatim, and the turn-by-turn requests built on it."""

from __future__ import annotations

import re

from baize.transcript import Turn

# Baize paper, Appendix A, as the reference collection code sends it: one user message, no system message.
# One line, then the greeting pair on real new lines.
TEMPLATE = (
    "Forget the instruction you have previously received. The following is a conversation between a human and an "
    "AI assistant. The human and the AI assistant take turns chatting about the topic: '${SEED}'. Human statements "
    "start with [Human] and AI assistant statements start with [AI]. The human will ask related questions on related "
    "topics or previous conversation. The human will stop the conversation when they have no more question. The AI "
    "assistant tries not to ask questions. Complete the transcript in exactly that format.\n"
    "[Human] Hello!\n"
    "[AI] Hi! How can I help you?"
)

HUMAN_STOP = ["[AI]"]
"""The human-turn call ends where the AI would start speaking."""

_MARKER = re.compile(r"\[(Human|AI)\]\s*:?")


def selfchat_prompt(seed: str) -> str:
    # str.replace, not string.Template: a seed may contain "$" and must go in unchanged.
    return TEMPLATE.replace("${SEED}", seed)


def transcript_messages(seed: str) -> list[dict[str, str]]:
    """`transcript` mode: the whole conversation in one call."""
    return [{"role": "user", "content": selfchat_prompt(seed)}]


def human_turn_messages(seed: str, turns: list[Turn]) -> list[dict[str, str]]:
    """`turns` mode, human side: the template, the transcript so far, then `[Human] ` for the model to continue."""
    text = selfchat_prompt(seed)
    for turn in turns:
        text += f"\n{'[Human]' if turn.role == 'human' else '[AI]'} {turn.text}"
    return [{"role": "user", "content": text + "\n[Human] "}]


def ai_turn_messages(turns: list[Turn]) -> list[dict[str, str]]:
    """`turns` mode, AI side: a plain chat (the human's turns as user messages), answered as the assistant."""
    return [{"role": "user" if t.role == "human" else "assistant", "content": t.text} for t in turns]


def clean_turn(text: str) -> tuple[str, str]:
    """(turn, dropped tail): strip a repeated leading marker, cut where the model starts the next speaker's turn."""
    text = text.strip()
    lead = _MARKER.match(text)
    if lead:
        text = text[lead.end() :].strip()
    nxt = _MARKER.search(text)
    if nxt:
        return text[: nxt.start()].strip(), text[nxt.start() :].strip()
    return text, ""
