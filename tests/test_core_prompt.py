"""Parsing chat, completion and /generate bodies into canonical prompts, and rejecting bad ones."""

from __future__ import annotations

from typing import Any

import pytest

from router.core.prompt import Prompt, PromptError, parse_chat, parse_completion, parse_generate

SECRET = "hunter2-do-not-echo"


def test_chat_one_segment_per_message_with_role() -> None:
    p = parse_chat(
        {
            "model": "llama",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
                },
            ],
            "max_tokens": 32,
            "user": "alice",
        }
    )
    assert p.kind == "chat"
    assert p.segments == ("system\nbe brief", "user\nhi there")
    assert p.input_ids is None
    assert p.salt == "llama"
    assert p.max_tokens == 32
    assert p.session_key == "alice"


def test_chat_plain_messages_fast_path_gives_the_general_segments() -> None:
    """{"role", "content": str} messages skip the general path; other shapes still take it."""

    class Text(str):
        pass

    body = {
        "messages": [
            {"role": "user", "content": "plain"},
            {"role": "user", "content": Text("subclass")},
            {"role": Text("user"), "content": "role subclass"},
            {"role": "user", "name": "bob", "content": "named"},
            {"role": "assistant", "content": None, "tool_calls": []},
        ]
    }
    assert parse_chat(body).segments == (
        "user\nplain",
        "user\nsubclass",
        "user\nrole subclass",
        "user:bob\nnamed",
        "assistant\n\n[]",
    )
    with pytest.raises(PromptError, match=r"messages\[1\]\.role must be one of"):
        parse_chat({"messages": [{"role": "user", "content": "x"}, {"role": "x", "content": "y"}]})
    with pytest.raises(PromptError, match=r"messages\[0\]\.role must be a string"):
        parse_chat({"messages": [{"role": ["user"], "content": "x"}]})


def test_chat_prefix_is_stable_across_turns() -> None:
    turn1 = [{"role": "user", "content": "q1"}]
    turn2 = [*turn1, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    a = parse_chat({"model": "m", "messages": turn1})
    b = parse_chat({"model": "m", "messages": turn2})
    assert b.segments[: len(a.segments)] == a.segments


def test_chat_salt_separates_models_and_cache_salt() -> None:
    msgs = [{"role": "user", "content": "x"}]
    assert (
        parse_chat({"model": "a", "messages": msgs}).salt
        != parse_chat({"model": "b", "messages": msgs}).salt
    )
    assert (
        parse_chat({"model": "a", "messages": msgs, "cache_salt": "t1"}).salt
        != parse_chat({"model": "a", "messages": msgs}).salt
    )


def test_chat_max_completion_tokens_wins_and_session_id() -> None:
    p = parse_chat(
        {
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "session_id": "s1",
            "user": "u",
        }
    )
    assert p.max_tokens == 7
    assert p.session_key == "s1"
    assert p.salt == ""


def test_chat_images_become_digests_not_payloads() -> None:
    url = "data:image/png;base64," + "A" * 10_000
    p = parse_chat(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
            ]
        }
    )
    (seg,) = p.segments
    assert seg.startswith("user\n<image_url:") and len(seg) < 100
    q = parse_chat(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url + "B"}}],
                }
            ]
        }
    )
    assert q.segments != p.segments


def test_chat_tools_and_tool_calls_are_part_of_prefix() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    p = parse_chat(
        {
            "tools": tools,
            "messages": [
                {"role": "user", "content": "call f"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "function": {"name": "f"}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ],
        }
    )
    assert p.segments[0].startswith("tools\n")
    assert '"name":"f"' in p.segments[2]
    assert p.segments[3] == "tool#c1\n42"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "request body must be a JSON object"),
        ({}, "messages must be a non-empty list"),
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": "hi"}, "messages must be a non-empty list"),
        ({"messages": [SECRET]}, "messages[0] must be an object"),
        ({"messages": [{"content": SECRET}]}, "messages[0].role must be a string"),
        ({"messages": [{"role": SECRET, "content": "x"}]}, "messages[0].role must be one of"),
        ({"messages": [{"role": "user"}]}, "messages[0].content is required"),
        (
            {"messages": [{"role": "user", "content": 5}]},
            "messages[0].content must be a string or a list",
        ),
        (
            {"messages": [{"role": "user", "content": [SECRET]}]},
            "messages[0].content[0] must be an object",
        ),
        (
            {"messages": [{"role": "user", "content": [{"text": SECRET}]}]},
            "messages[0].content[0].type must be a string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            "messages[0].content[0].text must be a string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": SECRET}]}]},
            "messages[0].content[0].type is not a supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].image_url is required",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "name": 1}]},
            "messages[0].name must be a string",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "tool_calls": {}}]},
            "messages[0].tool_calls must be a list",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "model": 1}, "model must be a string"),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"},
            "max_tokens must be an integer",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": True},
            "max_tokens must be an integer",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
            "max_tokens must be non-negative",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "user": 5}, "user must be a string"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": {}}, "tools must be a list"),
    ],
)
def test_chat_errors_are_clear_and_never_echo_the_prompt(body: Any, message: str) -> None:
    with pytest.raises(PromptError) as info:
        parse_chat(body)
    assert message in str(info.value)
    assert SECRET not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_completion_shapes() -> None:
    assert parse_completion({"prompt": "abc", "model": "m", "max_tokens": 5}).segments == ("abc",)
    batch = parse_completion({"prompt": ["a", "b"]})
    assert batch.segments == ("a", "b")
    ids = parse_completion({"prompt": [1, 2, 3]})
    assert ids.input_ids == (1, 2, 3) and ids.segments == ()
    rows = parse_completion({"prompt": [[1, 2], [3]]})
    assert rows.input_ids == (1, 2, 3)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "prompt is required"),
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": []}, "prompt must be a non-empty list"),
        ({"prompt": 7}, "prompt must be a non-empty list"),
        ({"prompt": ["a", 1]}, "prompt must be a string or a list of strings"),
        ({"prompt": [1, "a"]}, "prompt must contain only non-negative integer token ids"),
        ({"prompt": [1, -2]}, "prompt must contain only non-negative integer token ids"),
        ({"prompt": [True]}, "prompt must contain only non-negative integer token ids"),
        ({"prompt": [[1], []]}, "prompt[1] must be a non-empty list of token ids"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens must be an integer"),
    ],
)
def test_completion_errors(body: Any, message: str) -> None:
    with pytest.raises(PromptError, match=None) as info:
        parse_completion(body)
    assert message in str(info.value)


def test_generate_text_and_ids() -> None:
    p = parse_generate(
        {"text": "hello", "sampling_params": {"max_new_tokens": 12}, "lora_path": "ad1"}
    )
    assert p.kind == "generate" and p.segments == ("hello",) and p.max_tokens == 12
    assert "ad1" in p.salt
    q = parse_generate({"input_ids": [5, 6], "session_id": "s"})
    assert q.input_ids == (5, 6) and q.max_tokens is None and q.session_key == "s"
    r = parse_generate(
        {"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 3}, {"max_new_tokens": 4}]}
    )
    assert r.segments == ("a", "b") and r.max_tokens == 3


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "exactly one of text or input_ids is required"),
        ({"text": "a", "input_ids": [1]}, "exactly one of text or input_ids is required"),
        ({"text": [1, 2]}, "text must be a string or a list of strings"),
        ({"input_ids": "abc"}, "input_ids must be a list of token ids"),
        ({"input_ids": ["a"]}, "input_ids must be a list of token ids"),
        ({"text": "a", "sampling_params": 3}, "sampling_params must be an object"),
        (
            {"text": "a", "sampling_params": {"max_new_tokens": "x"}},
            "sampling_params.max_new_tokens must be an integer",
        ),
    ],
)
def test_generate_errors(body: Any, message: str) -> None:
    with pytest.raises(PromptError) as info:
        parse_generate(body)
    assert message in str(info.value)


def test_prompt_invariants() -> None:
    with pytest.raises(PromptError):
        Prompt(kind="chat")
    with pytest.raises(PromptError):
        Prompt(kind="generate", segments=("a",), input_ids=(1,))
