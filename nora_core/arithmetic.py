"""A seeded generator of multi-step arithmetic word problems, a MathInstruct-like fine-tuning task.

Each record is ``{"instruction": question, "output": worked solution}``, for example::

    {"instruction": "Compute (17 + 5) * 3 - 8.",
     "output": "17 + 5 = 22. 22 * 3 = 66. 66 - 8 = 58. The answer is 58."}

The operations are applied left to right (the parentheses in the question make that explicit), so the
solution is a chain of single steps a small model can learn. The same seed always yields the same
records; :func:`arithmetic_splits` returns disjoint train and validation sets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["ArithmeticTask", "generate_arithmetic", "arithmetic_splits"]

_OPS = ("+", "-", "*")


@dataclass(frozen=True)
class ArithmeticTask:
    """Shape of the generated problems.

    Attributes:
        min_steps: fewest operations in one problem (>= 1).
        max_steps: most operations in one problem.
        max_operand: operands are drawn from 1..max_operand (multipliers from 2..9).
    """

    min_steps: int = 2
    max_steps: int = 3
    max_operand: int = 50

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 2:
            raise ValueError(f"max_operand must be >= 2, got {self.max_operand}")


def _problem(rng: random.Random, task: ArithmeticTask) -> dict[str, str]:
    value = rng.randint(1, task.max_operand)
    expr = str(value)
    steps = []
    for i in range(rng.randint(task.min_steps, task.max_steps)):
        op = rng.choice(_OPS)
        operand = rng.randint(2, 9) if op == "*" else rng.randint(1, task.max_operand)
        result = value + operand if op == "+" else value - operand if op == "-" else value * operand
        steps.append(f"{value} {op} {operand} = {result}.")
        expr = f"({expr}) {op} {operand}" if i else f"{expr} {op} {operand}"
        value = result
    return {"instruction": f"Compute {expr}.", "output": " ".join(steps) + f" The answer is {value}."}


def generate_arithmetic(n: int, seed: int = 0, task: ArithmeticTask | None = None) -> list[dict[str, str]]:
    """Generate ``n`` distinct problems.

    Args:
        n: number of records.
        seed: random seed; the same seed gives the same list.
        task: problem shape; default :class:`ArithmeticTask`.

    Returns:
        ``n`` records ``{"instruction", "output"}`` with distinct instructions.
    """
    task = task or ArithmeticTask()
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems from {task}")
        record = _problem(rng, task)
        if record["instruction"] not in seen:
            seen.add(record["instruction"])
            records.append(record)
    return records


def arithmetic_splits(
    n_train: int, n_val: int, seed: int = 0, task: ArithmeticTask | None = None
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint train and validation sets (no instruction appears in both).

    Returns:
        ``(train, val)`` with ``n_train`` and ``n_val`` records.
    """
    records = generate_arithmetic(n_train + n_val, seed, task)
    return records[:n_train], records[n_train:]
