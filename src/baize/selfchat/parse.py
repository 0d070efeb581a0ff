"""Turn one raw self-chat reply (`[Human] ...` / `[AI] ...`) into complete Human/AI pairs, recording what was dropped.

A reply is split on line-initial markers: the template's `[Human]` / `[AI]`, or the training markers `[|Human|]` /
`[|AI|]` that a model already tuned on Baize data writes. Complete pairs are kept up to the first malformed turn
(an empty turn, an AI turn with no human turn before it, a human turn followed by another human turn); there
parsing stops, because later turns may refer to the missing answer. Everything from there on is recorded as
dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from baize.transcript import Role, Turn

# A marker counts only at the start of a line (leading spaces allowed), so "[AI]" quoted mid-sentence stays text.
# Both styles: the template's "[Human]" / "[AI]" and the training text's "[|Human|]" / "[|AI|]" (pipes balanced).
# Tolerates "[Human]text", "[Human]: text" and "[Human] : text". Shared with `prompts.clean_turn`.
MARKER = re.compile(r"^[^\S\n]*\[(?P<pipe>\|?)(?P<role>Human|AI)(?P=pipe)\][^\S\n]*:?", re.MULTILINE)

# The greeting pair that ends the self-chat template; models sometimes repeat it before the real dialogue.
TEMPLATE_HUMAN = "Hello!"
TEMPLATE_AI = "Hi! How can I help you?"


@dataclass
class Dropped:
    """A piece of the reply that is not in the result, and why."""

    # preamble | template_echo | empty | orphan_human | orphan_ai | after_malformed | trailing_incomplete | truncated
    reason: str
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
    """Split a reply on line-initial [Human]/[AI] (or [|Human|]/[|AI|]) markers; keep the complete Human->AI pairs.

    Parsing stops at the first malformed turn: the pairs before it are kept, the malformed turn is dropped with
    its own reason ("empty", "orphan_ai"; a human turn left without its answer, by another human turn or an empty
    AI turn, is "orphan_human"), and every later segment is dropped as "after_malformed".

    `truncated=True` means the reply hit max_tokens, so its last turn is cut: if that is an AI turn, its
    pair is dropped with reason "truncated" (a cut trailing human turn is "trailing_incomplete" anyway).
    """
    # Unlike the reference code, we keep the last complete pair (the reference drops the final [Human] segment even
    # when it is answered). Like it, we stop at the first malformed turn.
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    result = ParseResult()
    matches = list(MARKER.finditer(text))

    preamble = text[: matches[0].start()] if matches else text
    if preamble.strip():
        result.dropped.append(Dropped("preamble", preamble.strip()))

    segments: list[tuple[Role, str]] = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        role: Role = "human" if m.group("role") == "Human" else "ai"
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
    rest = segments[start:]
    for i, (role, seg) in enumerate(rest):
        last_ai_paired = False
        malformed = not seg or (role == "human" and pending is not None) or (role == "ai" and pending is None)
        if malformed:
            if pending is not None:  # its answer is missing (empty, or replaced by another human turn)
                result.dropped.append(Dropped("orphan_human", pending.text, "human"))
                pending = None
            if not seg:
                result.dropped.append(Dropped("empty", seg, role))
                after = rest[i + 1 :]
            elif role == "ai":
                result.dropped.append(Dropped("orphan_ai", seg, "ai"))
                after = rest[i + 1 :]
            else:  # the second of two human turns in a row: it may build on the missing answer
                after = rest[i:]
            result.dropped += [Dropped("after_malformed", s, r) for r, s in after]
            break
        if role == "human":
            pending = Turn(role="human", text=seg)
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
