"""Isolated template: a model that runs in a worker process of its own, from a virtualenv
built from its requirements.txt, within the limits config.yaml's `isolation:` sets.

Packages it imports (here python-dateutil) live only in that virtualenv, never in the
server's. List yours in requirements.txt (wheels only); the server builds the virtualenv
in the background on the first load and after every change to the file.
"""

from collections.abc import AsyncIterator
from datetime import date

from dateutil import parser
from dateutil.relativedelta import relativedelta

from ws_server import AnythingBaseModel

HINT = 'Mention a date ("when is 4 July 2027?") to hear its weekday and how far off it is.'


class IsolatedModel(AnythingBaseModel):
    """Tells the weekday of a date you mention and how far off it is (python-dateutil, in
    the model's own virtualenv)."""

    async def on_chat_messages(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        text = messages[-1]["content"].replace("?", " ")  # "2027?" would not read as a year
        try:
            when = parser.parse(text, fuzzy=True).date()
        except (ValueError, OverflowError):
            yield HINT
            return
        yield f"{when:%A} {when.day} {when:%B %Y}: "
        yield how_far(when, date.today())


def how_far(when: date, today: date) -> str:
    """ "in 2 years and 3 days", "5 months ago", "today"."""
    if when == today:
        return "today."
    delta = relativedelta(when, today) if when > today else relativedelta(today, when)
    units = [(delta.years, "year"), (delta.months, "month"), (delta.days, "day")]
    parts = [f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in units if n]
    span = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"in {span}." if when > today else f"{span} ago."
