"""The self-chat prompts: the paper's template (Appendix A) verbatim, and the turn-by-turn requests built on it."""

from __future__ import annotations

import re

from baize.selfchat.parse import MARKER
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

# `human_prompt: followup`: the human side as a plain question about the last exchange. Small chat models (135M)
# cannot continue the paper's template as the human, and echo a long instruction back; shown the last question and
# answer and asked "what is a good follow-up question?" they write one, often wrapped in a sentence ("A good
# follow-up question could be: ..."), which `extract_question` takes out. Measured on SmolLM2-135M-Instruct with 12
# generated answers x 3 samples: 19/36 usable questions with this wording; 9/36 with the answer alone, 5/36 with a
# two-example few-shot prompt, 6/18 with the whole transcript and a longer instruction.
FOLLOWUP_SYSTEM = "You write the next question of a curious human in a conversation. Reply with one question only."
OPENING_INSTRUCTION = "What is a good question to ask an AI assistant about this topic: '${SEED}'?"
FOLLOWUP_INSTRUCTION = "Question: ${QUESTION}\nAnswer: ${ANSWER}\n\nWhat is a good follow-up question?"
INSTRUCTIONS = (TEMPLATE, FOLLOWUP_SYSTEM, OPENING_INSTRUCTION, FOLLOWUP_INSTRUCTION)
"""Every instruction the self-chat sends: validation rejects a turn that echoes one of them."""

# A human turn that ends the conversation (besides an empty one): what the paper's template elicits ("The human
# will stop the conversation when they have no more question"), in either prompt mode.
_DONE = re.compile(
    r"^\W*(?:no (?:more|further|other) questions?|i (?:have|'ve got) no (?:more|further|other) questions?"
    r"|i don'?t have any (?:more|further|other) questions?|that'?s all(?: for now)?|nothing else)\b",
    re.IGNORECASE,
)

QUESTION_STOP = ["?", "\uff1f"]
"""`followup` human turns end at their question mark (it is put back: stop strings are not part of a reply)."""

HUMAN_STOP = ["[AI]"]
"""The human-turn call ends where the AI would start speaking."""


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


def followup_messages(seed: str, turns: list[Turn]) -> list[dict[str, str]]:
    """`turns` mode with `human_prompt: followup`: the last question and answer and "what is a good follow-up
    question?" (the opening question about the seed when there are no turns yet). The engine rejects a question
    that repeats the seed or an earlier one, so the rest of the transcript need not be in the prompt."""
    if not turns:
        user = OPENING_INSTRUCTION.replace("${SEED}", seed)
    else:
        # One pass over the template: a question or answer that itself contains "${ANSWER}" goes in unchanged.
        fields = {"QUESTION": turns[-2].text, "ANSWER": turns[-1].text}
        user = re.sub(r"\$\{(QUESTION|ANSWER)\}", lambda m: fields[m.group(1)], FOLLOWUP_INSTRUCTION)
    return [{"role": "system", "content": FOLLOWUP_SYSTEM}, {"role": "user", "content": user}]


# A question about the task rather than the topic ("What is a good follow-up question?", "What's your next question?").
_META_QUESTION = re.compile(
    r"\b(?:follow-?up question|next question|first question|(?:any|more|other|further) questions"
    r"|your question|ask (?:a|me a|another) question|continue the conversation|this one|you'?d like|would you like"
    r"|on your mind|previous question|explore further)\b",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"[^.!?\n\uff1f\u3002]*[?\uff1f]")


def extract_question(text: str) -> str | None:
    """The question in a `followup` reply: the reply itself when it is one question, else the first complete
    question sentence in it that is about the topic, not about the task; None when there is none.

    "A good follow-up question could be: \"How do banks set rates?\"" -> "How do banks set rates?"."""
    text = strip_question_label(text)
    if is_done(text):
        return ""
    for match in _SENTENCE.finditer(text):
        sentence = match.group(0)
        # Drop a lead-in that ends in a colon ("A good follow-up question would be: ...") and wrapping quotes.
        sentence = sentence.rsplit(":", 1)[-1] if ":" in sentence and not re.search(r"https?:", sentence) else sentence
        sentence = strip_question_label(sentence.strip().strip("\"'\u201c\u201d*` "))
        if len(sentence.split()) >= 3 and not _META_QUESTION.search(sentence):
            return sentence
    return None


def ai_turn_messages(turns: list[Turn], system: str | None = None) -> list[dict[str, str]]:
    """`turns` mode, AI side: a plain chat (the human's turns as user messages), answered as the assistant;
    `system` (selfchat.ai_system_prompt) goes first when set."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user" if t.role == "human" else "assistant", "content": t.text} for t in turns]


def is_done(text: str) -> bool:
    """The human has nothing more to ask: an empty turn or a "no more questions" reply."""
    return not text.strip() or bool(_DONE.match(text))


def normalize_question(text: str) -> str:
    """Case, punctuation and spacing folded: two questions that differ only there are the same question."""
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def repeats(text: str, earlier: list[str], threshold: float = 0.7) -> bool:
    """Whether `text` merely repeats one of `earlier` (the seed, earlier human turns): the same normalized words,
    or a word-set Jaccard similarity of at least `threshold`."""
    words = set(normalize_question(text).split())
    if not words:
        return False
    for other in earlier:
        theirs = set(normalize_question(other).split())
        if theirs and len(words & theirs) / len(words | theirs) >= threshold:
            return True
    return False


def strip_question_label(text: str) -> str:
    """Small models often wrap the question they were asked to write: `Question: "..."` -> `...`."""
    text = re.sub(r"^\s*(?:(?:the )?(?:human'?s? )?(?:next |follow-?up )?question|human|q)\s*[:\-]\s*", "", text, flags=re.I)
    text = text.strip()
    if len(text) >= 2 and text[0] in "\"'“" and text[-1] in "\"'”" and text.count(text[0]) <= 2:
        text = text[1:-1].strip()
    return text


def clean_turn(text: str) -> tuple[str, str]:
    """(turn, dropped tail): strip a repeated leading marker, cut where the model starts the next speaker's turn.

    Both cut where `parse_selfchat` would split: at a `[Human]` / `[AI]` / `[|Human|]` / `[|AI|]` marker at the
    start of a line, so a marker quoted mid-sentence stays in the turn.
    """
    text = text.strip()
    lead = MARKER.match(text)
    start = lead.end() if lead else 0
    # Search from after the leading marker: "^" matches only at real line starts, not at `start` itself.
    nxt = MARKER.search(text, start)
    if nxt:
        return text[start : nxt.start()].strip(), text[nxt.start() :].strip()
    return text[start:].strip(), ""
