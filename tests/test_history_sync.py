"""An isolated worker keeps each session's history, and a turn sends only what changed:
whatever the server's history went through (appends, trimming past the limits with or
without a kept system message, a client replacing it all), the worker's copy after the
delta is the server's, message for message; and a plain append sends only the new ones."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ws_server.isolation.history_sync import HistoryDelta, apply, delta
from ws_server.session.history import History


def message(role: str, text: str) -> dict[str, str]:
    return {"role": role, "content": text}


def test_appended_messages_are_all_that_travel() -> None:
    history = History(max_messages=100, max_bytes=1 << 20)
    history.append(message("user", "hi"))
    first = history.messages()
    history.append(message("assistant", "hello"))
    history.append(message("user", "again"))
    now = history.messages()
    assert delta(first, now) == HistoryDelta(1, 0, now[1:])
    assert apply(first, *delta(first, now)) == now


def test_trimming_after_a_kept_system_message_drops_rather_than_resends() -> None:
    history = History(max_messages=4, max_bytes=1 << 20)
    history.replace([message("system", "be brief")])
    for index in range(3):
        history.append(message("user", f"q{index}"))
    held = history.messages()
    history.append(message("assistant", "a2"))  # over 4: the oldest after the system goes
    now = history.messages()
    change = delta(held, now)
    assert (change.head, change.drop) == (1, 1) and change.appended == now[-1:]
    assert apply(held, *change) == now


def test_trimming_a_history_of_equal_messages_still_sends_only_the_new_ones() -> None:
    """The same question again and again: messages equal by value, told apart by identity."""
    history = History(max_messages=6, max_bytes=1 << 20)
    for _ in range(3):
        history.append(message("user", "same"))
        history.append(message("assistant", "same"))
    held = history.messages()
    history.append(message("user", "same"))
    history.append(message("assistant", "same"))
    now = history.messages()
    assert delta(held, now) == HistoryDelta(0, 2, now[-2:])


def test_without_a_copy_everything_is_sent() -> None:
    now = [message("user", "hi")]
    assert delta(None, now) == HistoryDelta(0, 0, now)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.sampled_from(["user", "assistant", "system"])),
        st.tuples(st.just("replace"), st.integers(min_value=0, max_value=4)),
        st.tuples(st.just("turn"), st.none()),
    ),
    max_size=40,
)


@given(operations, st.integers(min_value=1, max_value=6), st.integers(min_value=8, max_value=80))
def test_the_workers_copy_always_ends_up_as_the_servers(
    steps: list[tuple[str, object]], max_messages: int, max_bytes: int
) -> None:
    history = History(max_messages=max_messages, max_bytes=max_bytes)
    worker: list[dict[str, str]] = []  # the worker's copy, built from deltas only
    held: list[dict[str, str]] | None = None
    for count, (kind, argument) in enumerate(steps):
        if kind == "append":
            history.append(message(str(argument), f"m{count}"))
        elif kind == "replace":
            history.replace([message("user", f"r{count}-{i}") for i in range(int(argument))])
        else:
            now = history.messages()
            worker = apply(worker if held is not None else [], *delta(held, now))
            held = now
            assert worker == now and all(a is b for a, b in zip(worker, now, strict=True))
