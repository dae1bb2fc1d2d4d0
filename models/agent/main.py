"""Agent: a small offline agent that plans, calls a tool and answers, showing each step.

Every turn reports what it does besides text: a status line, a "plan" step and, inside it,
the tool it calls (a calculator or a clock) with its input and output. The browser page
shows them as collapsible steps; `anything-agent chat --json` prints them as event frames.
Add a tool: write a function from a string to a string, put it in TOOLS, and teach
`choose_tool` when to use it.
"""

import ast
import asyncio
import operator
import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from ws_server import AnythingBaseModel

HELP = (
    "I'm a small offline agent with two tools, a calculator and a clock. "
    'Try "what is 12 * (3 + 4)?" or "what time is it?".'
)
TIME_QUESTION = re.compile(
    r"\b(what time|the time|time is it|current time|what day|today's date|the date)\b",
    re.IGNORECASE,
)
ARITHMETIC = re.compile(r"^[\d\s.+\-*/%()^×÷]+$")  # and a digit somewhere (checked apart)
MAX_EXPRESSION = 200  # characters: a longer "expression" is no question for a calculator
QUESTION_WORDS = re.compile(
    r"^\s*(?:please\s+)?(?:what(?:'s| is)|how much is|calculate|compute|work out|solve)\s+",
    re.IGNORECASE,
)
OPERATORS: dict[type, Callable[..., float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
# Bounds that keep one question from keeping the calculator busy for hours (9 ** 9 ** 9).
MAX_EXPONENT = 100
MAX_BITS = 10_000


def calculator(expression: str) -> str:
    """Work out an arithmetic expression (+ - * / // % ** and parentheses), safely: the
    text is parsed, never run as Python."""
    text = expression.replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError("that is not an expression I can read") from None
    result = _evaluate(tree.body)
    if isinstance(result, float):
        return str(int(result) if result.is_integer() and abs(result) < 1e15 else round(result, 10))
    return str(result)


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"an exponent over {MAX_EXPONENT} is more than I can take")
        result = OPERATORS[type(node.op)](left, right)
        if isinstance(result, int) and result.bit_length() > MAX_BITS:
            raise ValueError("that number is too big for me")
        return result
    raise ValueError("that is not plain arithmetic")


def clock(question: str) -> str:
    """The local date and time."""
    return datetime.now().astimezone().strftime("%A %d %B %Y, %H:%M (UTC%z)")


TOOLS: dict[str, Callable[[str], str]] = {"calculator": calculator, "clock": clock}
ANSWERS = {"calculator": "{input} = {output}", "clock": "It is {output}."}


def choose_tool(question: str) -> tuple[str, str] | None:
    """Which tool answers the question, and its input; None when none does."""
    if TIME_QUESTION.search(question):
        return "clock", question
    expression = QUESTION_WORDS.sub("", question).strip().rstrip("?=!. ")
    if (
        len(expression) <= MAX_EXPRESSION
        and ARITHMETIC.match(expression)
        and re.search(r"\d", expression)
        and re.search(r"[-+*/%^×÷]", expression)
    ):
        return "calculator", expression
    return None


class AgentModel(AnythingBaseModel):
    """A small offline agent: arithmetic and the time, showing its plan and tool calls as
    steps. Try "what is 12 * (3 + 4)?" or "what time is it?"."""

    async def on_chat_messages(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        question = messages[-1]["content"].strip()
        self.status("thinking…")
        with self.step("plan", input=question) as plan:
            choice = choose_tool(question)
            if choice is None:
                plan.output = "no tool fits: explain what I can do"
                answer = HELP
            else:
                tool, argument = choice
                plan.output = f"ask the {tool}"
                try:
                    with self.step(tool, input=argument) as call:
                        call.output = TOOLS[tool](argument)  # an exception ends it "error"
                except (ArithmeticError, ValueError) as exc:
                    answer = f"I couldn't work that out: {exc}."
                else:
                    answer = ANSWERS[tool].format(input=argument, output=call.output)
        delay = float(self.config.get("parameters", {}).get("delay", 0))
        for index, word in enumerate(answer.split(" ")):
            yield word if index == 0 else " " + word
            if delay:
                await asyncio.sleep(delay)
