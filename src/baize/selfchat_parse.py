"""Turn one raw self-chat reply (`[Human] ...` / `[AI] ...`) into complete Human/AI pairs, recording what was dropped."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from baize.transcript import Role, Turn

# A marker counts only at the start of a line (leading spaces allowed), so "[AI]" quoted mid-sentence stays text.
# Tolerates "[Human]text", "[Human]: text" and "[Human] : text".
_MARKER = re.compile(r"^[^\S\n]*\[(Human|AI)\][^\S\n]*:?", re.MULTILINE)

# The greeting pair that ends the self-chat template; models sometimes repeat it before the real dialogue.
TEMPLATE_HUMAN = "Hello!"
TEMPLATE_AI = "Hi! How can I help you?"


@dataclass
class Dropped:
    """A piece of the reply that is not in the result, and why."""

    reason: str  # preamble | template_echo | empty | orphan_human | orphan_ai | trailing_incomplete | truncated
    text: str
    role: Role | None = None


@dataclass
class ParseResult:
    turns: list[Turn] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)

    @property
    def complete_pairs(self) -> list[tuple[str, str]]:
        """The kept (human, ai) text pairs; turns always alternate human, ai."""
        return [(self.turns[i].text, self.turns[i + 1].text) for i in range(0, len(self.turns), 2)]


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _is_echo(role: str, text: str) -> bool:
    return _norm(text) == _norm(TEMPLATE_HUMAN if role == "human" else TEMPLATE_AI)


def parse_selfchat(raw: str, *, truncated: bool = False) -> ParseResult:
    """Split a reply on line-initial [Human]/[AI] markers and keep every complete Human->AI pair.

    `truncated=True` means the reply hit max_tokens, so its last turn is cut: if that is an AI turn, its
    pair is dropped with reason "truncated" (a cut trailing human turn is "trailing_incomplete" anyway).
    """
    # Unlike the reference code, we keep the last complete pair and skip past a malformed turn instead of stopping.
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    result = ParseResult()
    matches = list(_MARKER.finditer(text))

    preamble = text[: matches[0].start()] if matches else text
    if preamble.strip():
        result.dropped.append(Dropped("preamble", preamble.strip()))

    segments: list[tuple[Role, str]] = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        role: Role = "human" if m.group(1) == "Human" else "ai"
        segments.append((role, text[m.end() : end].strip()))

    # Drop a leading echo of the template greeting: the human line and/or the AI answer to it.
    start = 0
    if segments and segments[0][0] == "human" and _is_echo(*segments[0]):
        if len(segments) > 1 and segments[1][0] == "ai" and _is_echo(*segments[1]):
            start = 2
    elif segments and segments[0][0] == "ai" and _is_echo(*segments[0]):
        start = 1
    for role, seg in segments[:start]:
        result.dropped.append(Dropped("template_echo", seg, role))

    pending: Turn | None = None  # a human turn waiting for its answer
    last_ai_paired = False  # whether the reply's final segment ended up as the AI half of a kept pair
    for role, seg in segments[start:]:
        last_ai_paired = False
        if not seg:
            result.dropped.append(Dropped("empty", seg, role))
            continue
        if role == "human":
            if pending is not None:
                result.dropped.append(Dropped("orphan_human", pending.text, "human"))
            pending = Turn(role="human", text=seg)
        elif pending is None:
            result.dropped.append(Dropped("orphan_ai", seg, "ai"))
        else:
            result.turns += [pending, Turn(role="ai", text=seg)]
            pending = None
            last_ai_paired = True
    if pending is not None:
        result.dropped.append(Dropped("trailing_incomplete", pending.text, "human"))

    if truncated and last_ai_paired:
        human, ai = result.turns[-2:]
        del result.turns[-2:]
        result.dropped += [Dropped("truncated", human.text, "human"), Dropped("truncated", ai.text, "ai")]
    return result
