"""The dialogue format: HH parsing, end-of-turn ids, history truncation, the piped chat loop."""

import io

import pytest

from gptjax.data.tokenizer import ByteTokenizer
from gptjax.rlhf import chat
from tests.rlhf_fixtures import CFG, params

HH = (
    "\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant: Are you looking for "
    "practical joke ideas?\n\nHuman: yep\n\nAssistant: Ok, here are two:\n\n1. Draw.\n\n2. Hide."
)


def test_parse_dialogue_keeps_blank_lines_inside_turns_and_round_trips():
    turns = chat.parse_dialogue(HH)
    assert [r for r, _ in turns] == ["Human", "Assistant", "Human", "Assistant"]
    assert turns[3][1] == "Ok, here are two:\n\n1. Draw.\n\n2. Hide."
    assert chat.render(turns) == HH


@pytest.mark.parametrize("bad", ["", "no markers at all", "preamble\n\nHuman: hi"])
def test_parse_dialogue_rejects_non_dialogues(bad):
    with pytest.raises(ValueError, match="Human/Assistant"):
        chat.parse_dialogue(bad)


def test_assistant_turns_end_with_the_end_of_turn_id():
    tok = ByteTokenizer()
    turns = [("Human", "hi"), ("Assistant", "yo"), ("Human", "ok")]
    ids = chat.encode_turns(tok, turns)
    assert ids.count(tok.eos_id) == 1
    assert ids[: ids.index(tok.eos_id)] == tok.encode("\n\nHuman: hi\n\nAssistant: yo")
    prompt = chat.prompt_ids(tok, turns)
    assert tok.decode(prompt).endswith("\n\nHuman: ok\n\nAssistant:")
    # A reply as SFT trains it, decoded back as chat shows it.
    assert chat.decode_reply(tok, chat.response_ids(tok, "fine") + [7, 7]) == "fine"


def test_truncation_drops_the_oldest_turns_first():
    tok = ByteTokenizer()
    turns = [
        ("Human", f"question {i}") if i % 2 == 0 else ("Assistant", f"answer {i}") for i in range(7)
    ]
    full = len(chat.prompt_ids(tok, turns))
    budget = len(chat.prompt_ids(tok, turns[-3:]))  # room for exactly the last three turns
    kept, ids = chat.truncate_history(tok, turns, budget)
    assert kept == turns[-3:]
    assert ids == chat.prompt_ids(tok, turns[-3:]) and len(ids) <= budget < full
    kept, ids = chat.truncate_history(tok, turns, budget - 1)
    assert kept == turns[-2:]
    # A newest turn longer than the budget keeps its last tokens.
    kept, ids = chat.truncate_history(tok, [("Human", "x" * 100)], 20)
    assert len(ids) == 20 and tok.decode(ids).endswith("\n\nAssistant:")
    with pytest.raises(ValueError, match="budget"):
        chat.truncate_history(tok, turns, 0)


def test_chat_loop_reads_piped_lines_and_keeps_the_transcript():
    tok = ByteTokenizer()
    out = io.StringIO()
    # Both prompts are over 32 bytes, so both are padded to the 40-byte budget (one compile);
    # the second history no longer fits and keeps only the newest turn.
    lines = io.StringIO("hello there!\n\nhow are you?\n")
    transcript = chat.chat_loop(CFG, params(0), tok, lines, out, max_new_tokens=8, temperature=1.0)
    printed = out.getvalue()  # a random model may well emit newline bytes
    assert printed.startswith("Assistant: ") and printed.count("Assistant: ") == 2
    assert [r for r, _ in transcript] == ["Human", "Assistant", "Human", "Assistant"]
    assert transcript[2] == ("Human", "how are you?")
