"""A session's history: newest kept, oldest dropped first, a leading system message kept
while it fits, sizes counted once."""

from __future__ import annotations

from ws_server.session.history import History


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_messages_over_the_count_drop_the_oldest() -> None:
    history = History(max_messages=3, max_bytes=10_000)
    for index in range(5):
        history.append(user(f"m{index}"))
    assert [m["content"] for m in history.messages()] == ["m2", "m3", "m4"]


def test_bytes_over_the_limit_drop_the_oldest_and_count_utf8() -> None:
    history = History(max_messages=100, max_bytes=10)
    history.append(user("ééé"))  # 6 bytes
    history.append(user("abcd"))  # 4 bytes: 10 in all, fits
    assert len(history) == 2 and history.bytes == 10
    history.append(user("x"))
    assert [m["content"] for m in history.messages()] == ["abcd", "x"]
    assert history.bytes == 5


def test_a_leading_system_message_is_kept_while_the_newest_fits() -> None:
    history = History(max_messages=3, max_bytes=100)
    history.replace([{"role": "system", "content": "be brief"}, user("a"), user("b")])
    history.append(user("c"))
    assert [m["content"] for m in history.messages()] == ["be brief", "b", "c"]
    history.append(user("z" * 95))  # the newest alone nearly fills the budget
    assert [m["content"] for m in history.messages()] == ["z" * 95]


def test_the_newest_message_is_always_kept() -> None:
    history = History(max_messages=2, max_bytes=3)
    history.append(user("a"))
    history.append(user("too long for the limit"))
    assert [m["content"] for m in history.messages()] == ["too long for the limit"]


def test_the_model_gets_a_copy() -> None:
    history = History(max_messages=10, max_bytes=100)
    history.append(user("a"))
    history.messages().append(user("sneaky"))
    assert len(history) == 1
