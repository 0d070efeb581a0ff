"""Self-chat: a chat model talks to itself about a seed and writes a Human/AI transcript.

- `prompts`: the paper's template and the turn-by-turn requests.
- `backend`: the one interface every backend implements (`complete(ChatRequest) -> Completion`).
- `openai_backend`, `batch_backend`, `local_backend`: the backends.
- `journal`: the append-only record of every paid reply (nothing lost, nothing paid twice).
- `engine`: runs every seed under the limits and the budget, and builds transcripts and failures.
"""
