"""The Baize training format as a Jinja chat template, so `apply_chat_template`, TRL and `transformers serve/chat`
speak Baize without custom code.

For a conversation that ends with an assistant message, the template renders exactly
`baize.formats.render_training` (the released data and the text the `tokenize` stage trains on):

    {preamble}[|Human|] {h1}\\n[|AI|] {a1}\\n[|Human|] {h2}\\n[|AI|] {a2}\\n[|Human|] 

Semantics, decided so that a prompt is always a token-level prefix of the training text:

- preamble: a leading `system` message's content (a newline is added unless it is empty or already ends
  with one); without one, `baize.formats.PREAMBLE`. The Korean release, for instance, has its own preamble.
- `add_generation_prompt=True` (the conversation must end with a user message) appends `[|AI|]` with NO
  trailing space: in training the space after `[|AI|]` is part of the answer's first token (" Hi" in
  byte-level BPE, "▁Hi" in SentencePiece), so a prompt ending in a bare space would be a tokenization the
  model never saw. The model generates " {answer}\\n[|Human|]"; stop on `[|Human|]` (and `[|AI|]`), then
  strip the leading space.
- `{% generation %}` wraps exactly " {a}\\n[|Human|]" of every assistant turn: the answer plus the marker
  that ends it, i.e. what the model must generate after the prompt, stop marker included. This is the
  same character span the `tokenize` stage trains in `ai_only` mode, so
  `return_assistant_tokens_mask=True` (TRL `assistant_only_loss`) gives the same tokens as our labels.
- without a generation prompt, a conversation ending in an assistant message gets the dangling "[|Human|] "
  of the training text; one ending in a user message ends with "[|Human|] {h}\\n".
- errors (raised, never silently mis-rendered): roles other than system (first only), user, assistant;
  turns that do not alternate user, assistant, ...; a generation prompt after an assistant message; and
  any content containing `[|Human|]` or `[|AI|]`, which would forge a turn boundary (prompt injection).
- content may be a string or a list of `{"type": "text", "text": ...}` parts (joined with a space, as
  `transformers serve` does); other part types are ignored.

No EOS token is written: the Baize format ends each AI turn with the next `[|Human|]` marker, which is the
stop signal (the reference `finetune.py` never appended EOS either).
"""

from __future__ import annotations

from typing import Any

from baize.formats import AI, HUMAN, PREAMBLE

# Jinja string literals use Python escapes; the markers and preamble are spliced in from baize.formats so
# the template can never drift from render_training.
BAIZE_CHAT_TEMPLATE = (
    """{#- Baize training format; see baize/chat_template.py for the exact semantics. -#}
{%- set HUMAN = '@HUMAN@' -%}
{%- set AI = '@AI@' -%}
{%- macro as_text(content) -%}
{%- if content is none -%}
{%- elif content is string -%}{{ content }}
{%- else -%}{%- for part in content if part['type'] == 'text' -%}{{ (' ' if not loop.first else '') + part['text'] }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set preamble = as_text(messages[0]['content']) -%}
{%- if preamble and not preamble.endswith('\\n') -%}{%- set preamble = preamble + '\\n' -%}{%- endif -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set preamble = '@PREAMBLE@' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- if HUMAN in preamble or AI in preamble -%}{{ raise_exception('Baize: the system message contains ' + HUMAN + ' or ' + AI + ', which would forge a turn') }}{%- endif -%}
{{- preamble -}}
{%- set ns = namespace(prev='none') -%}
{%- for message in loop_messages -%}
{%- set content = as_text(message['content']) -%}
{%- if HUMAN in content or AI in content -%}{{ raise_exception('Baize: message ' + loop.index0|string + ' (' + message['role'] + ') contains ' + HUMAN + ' or ' + AI + ', which would forge a turn') }}{%- endif -%}
{%- if message['role'] == 'user' -%}
{%- if ns.prev == 'user' -%}{{ raise_exception('Baize: two user messages in a row; turns must alternate user, assistant') }}{%- endif -%}
{#- after an assistant turn, its generation block already wrote the [|Human|] marker that ends it -#}
{%- if ns.prev != 'assistant' -%}{{- HUMAN -}}{%- endif -%}
{{- ' ' + content + '\\n' -}}
{%- elif message['role'] == 'assistant' -%}
{%- if ns.prev != 'user' -%}{{ raise_exception('Baize: an assistant message must follow a user message') }}{%- endif -%}
{{- AI -}}
{%- generation -%}{{- ' ' + content + '\\n' + HUMAN -}}{%- endgeneration -%}
{%- else -%}
{{ raise_exception('Baize: role ' + message['role'] + ' is not supported (system first, then user/assistant)') }}
{%- endif -%}
{%- set ns.prev = message['role'] -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{%- if ns.prev != 'user' -%}{{ raise_exception('Baize: add_generation_prompt needs the conversation to end with a user message') }}{%- endif -%}
{{- AI -}}
{%- elif ns.prev == 'assistant' -%}
{{- ' ' -}}
{%- endif -%}"""
    .replace("@HUMAN@", HUMAN)
    .replace("@AI@", AI)
    .replace("@PREAMBLE@", PREAMBLE.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n"))
)

# What a client must stop generation on (the paper's inference stop strings).
STOP_STRINGS = (HUMAN, AI)


def set_baize_chat_template(tokenizer: Any) -> Any:
    """Give `tokenizer` the Baize chat template (in place, also returned).

    Without a pad token the trainer's dynamic padding cannot work; padded positions are never trained
    (label -100, attention 0), so any existing token will do: unk, else eos.
    """
    tokenizer.chat_template = BAIZE_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer
