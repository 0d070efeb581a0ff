"""Self-chat: a chat model talks to itself about a seed and writes a Human/AI transcript.

- `prompts`: the paper's template, the turn-by-turn requests (template or follow-up question) and the checks on a
  generated human turn (a question? a repeat? "no more questions"?).
- `parse`: a raw reply in the `[Human]` / `[AI]` (or `[|Human|]` / `[|AI|]`) format -> complete Human/AI pairs.
- `backend`: the one interface every backend implements (`complete(ChatRequest) -> Completion`).
- `openai_backend`, `batch_backend`, `local_backend`: the backends.
- `journal`: the append-only record of every paid reply (nothing lost, nothing paid twice).
- `engine`: runs every seed under the limits and the budget, and builds transcripts and failures.
"""
