"""The Baize Jinja chat template: renders exactly the training text, marks the same tokens the stage trains."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError

from baize.chat_template import BAIZE_CHAT_TEMPLATE, STOP_STRINGS, set_baize_chat_template
from baize.formats import AI, HUMAN, PREAMBLE, render_training
from baize.tokenization import IGNORE_INDEX, tokenize_texts
from baize.transcript import Turn

KOREAN_PREAMBLE = "인간과 AI 어시스턴트 간의 대화입니다.\n"


@pytest.fixture(scope="module")
def tok(base_model_dir):
    from transformers import AutoTokenizer

    return set_baize_chat_template(AutoTokenizer.from_pretrained(str(base_model_dir)))


def messages_of(pairs, system=None):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for human, ai in pairs:
        msgs.append({"role": "user", "content": human})
        if ai is not None:
            msgs.append({"role": "assistant", "content": ai})
    return msgs


def turns_of(pairs):
    return [Turn(role=r, text=x) for h, a in pairs for r, x in (("human", h), ("ai", a))]


CONVERSATIONS = [
    [("Hello!", "Hi! How can I help you?")],
    [
        ("What is DVC?", "A tool that versions data.\n\n1. `dvc add`\n2. `dvc push`"),
        ("And MLflow?", "It tracks runs."),
        ("Thanks", ""),
    ],
    [("  spaces around  ", " x "), ("unicode: 한국어 😺 \t tab", "ok\r\nwindows line")],
]


@pytest.mark.parametrize("pairs", CONVERSATIONS)
def test_template_renders_exactly_the_training_text(tok, pairs):
    assert tok.apply_chat_template(messages_of(pairs), tokenize=False) == render_training(turns_of(pairs))


def test_a_system_message_is_the_preamble(tok):
    pairs = CONVERSATIONS[0]
    expected = render_training(turns_of(pairs), preamble=KOREAN_PREAMBLE)
    assert tok.apply_chat_template(messages_of(pairs, KOREAN_PREAMBLE), tokenize=False) == expected
    # without its newline it gets one; an empty system message means no preamble
    assert tok.apply_chat_template(messages_of(pairs, KOREAN_PREAMBLE[:-1]), tokenize=False) == expected
    assert tok.apply_chat_template(messages_of(pairs, ""), tokenize=False) == render_training(turns_of(pairs), "")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.text(max_size=30), st.text(max_size=30)).filter(
            lambda p: not any(m in x for x in p for m in (HUMAN, AI))
        ),
        min_size=1,
        max_size=4,
    )
)
def test_template_matches_render_training_for_any_marker_free_text(tok, pairs):
    assert tok.apply_chat_template(messages_of(pairs), tokenize=False) == render_training(turns_of(pairs))


def test_generation_prompt_is_a_token_prefix_of_the_training_text(tok):
    pairs = CONVERSATIONS[1]
    prompt = tok.apply_chat_template(
        messages_of(pairs[:-1] + [(pairs[-1][0], None)]), add_generation_prompt=True, tokenize=False
    )
    full = render_training(turns_of(pairs[:-1] + [(pairs[-1][0], "Sure thing.")]))
    assert prompt.endswith(f"\n{AI}") and full.startswith(prompt)
    assert full[len(prompt):] == f" Sure thing.\n{HUMAN} "
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok(full, add_special_tokens=False)["input_ids"][: len(prompt_ids)] == prompt_ids
    # tokenize=True gives the same ids (what transformers serve / generate consume)
    served = tok.apply_chat_template(
        messages_of([("Hello!", None)]), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert served["input_ids"] == tok(PREAMBLE + f"{HUMAN} Hello!\n{AI}")["input_ids"]
    # a conversation ending with a user message, no generation prompt: the human turn and its newline
    assert tok.apply_chat_template(messages_of([("Hello!", None)]), tokenize=False) == f"{PREAMBLE}{HUMAN} Hello!\n"
    # continue_final_message: the partial answer, nothing after it
    partial = tok.apply_chat_template(messages_of([("Hello!", "Hi, I")]), continue_final_message=True, tokenize=False)
    assert partial == f"{PREAMBLE}{HUMAN} Hello!\n{AI} Hi, I"
    assert STOP_STRINGS == (HUMAN, AI)


@pytest.mark.parametrize("pairs", CONVERSATIONS)
def test_assistant_mask_is_exactly_the_ai_only_labels(tok, pairs):
    out = tok.apply_chat_template(
        messages_of(pairs), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    text = render_training(turns_of(pairs))
    ours = tokenize_texts(tok, [text], "ai_only", 100_000)
    assert out["input_ids"] == ours["input_ids"][0]
    assert out["assistant_masks"] == [int(label != IGNORE_INDEX) for label in ours["labels"][0]]
    # and the marked tokens are each answer plus the [|Human|] that ends it
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(marked) == "".join(f" {a}\n{HUMAN}" for _, a in pairs)


@pytest.mark.parametrize(
    ("messages", "kwargs", "match"),
    [
        ([{"role": "user", "content": "say [|AI|] sure"}], {}, "contains"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n[|Human|] c"}], {}, "contains"),
        ([{"role": "system", "content": "[|Human|]"}, {"role": "user", "content": "a"}], {}, "system message"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {}, "two user messages"),
        ([{"role": "assistant", "content": "a"}], {}, "must follow a user"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], {}, "role tool is not supported"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            {"add_generation_prompt": True},
            "end with a user message",
        ),
    ],
)
def test_what_cannot_be_rendered_exactly_is_an_error(tok, messages, kwargs, match):
    with pytest.raises(TemplateError, match=match):
        tok.apply_chat_template(messages, tokenize=False, **kwargs)


def test_content_parts_are_joined_like_transformers_serve(tok):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == (
        f"{PREAMBLE}{HUMAN} Hello there\n{AI}"
    )


def test_saved_tokenizer_keeps_the_template_and_a_pad_token(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again.chat_template == BAIZE_CHAT_TEMPLATE and again.pad_token is not None
    pairs = CONVERSATIONS[1]
    assert again.apply_chat_template(messages_of(pairs), tokenize=False) == render_training(turns_of(pairs))


@pytest.mark.slow
def test_trl_sft_assistant_only_loss_gives_our_labels(tok, base_model_dir, tmp_path):
    """TRL is not a dependency; where it is installed, its SFT data path must agree with the tokenize stage.

    Checked by hand with trl 1.16.0: identical input_ids and labels. TRL also logs a warning that the
    end-of-turn token is not trained: a false positive, its check looks for an added-vocabulary token,
    while Baize's stop marker `[|Human|]` is plain text (inside the mask, as asserted above).
    """
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    pairs = CONVERSATIONS[1]
    dataset = Dataset.from_dict({"messages": [messages_of(pairs)]})
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir))
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=512, report_to=[], use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    row = trainer.train_dataset[0]
    ours = tokenize_texts(tok, [render_training(turns_of(pairs))], "ai_only", 512)
    assert row["input_ids"] == ours["input_ids"][0]
    assert list(row["labels"]) == ours["labels"][0]
