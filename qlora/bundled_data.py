"""The bundled offline dataset: order messages -> one-line JSON records.

Deterministic for a given seed. Each row is a chat (`messages`): a fixed system instruction, a customer message
in one of several phrasings and date styles, and the exact JSON answer. Answers are checkable by exact match:
the keys come in a fixed order, the date is normalised to ISO 8601 and the quantity to an integer.
"""

from __future__ import annotations

import json
import random
from datetime import date, timedelta

SYSTEM_PROMPT = "Reply with the order as JSON only: name, item, quantity (integer), date (YYYY-MM-DD)."

FIRST_NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dmitri",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kara",
    "Luis",
    "Mei",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yusuf",
    "Zoe",
]
LAST_NAMES = [
    "Alvarez",
    "Brooks",
    "Chen",
    "Dubois",
    "Evans",
    "Fischer",
    "Garcia",
    "Haddad",
    "Ito",
    "Jensen",
    "Kowalski",
    "Lopez",
    "Moreau",
    "Novak",
    "Okafor",
    "Patel",
    "Rossi",
    "Silva",
    "Tanaka",
    "Weber",
]
ITEMS = [
    "desk lamp",
    "USB cable",
    "coffee grinder",
    "yoga mat",
    "water bottle",
    "laptop stand",
    "notebook",
    "phone case",
    "backpack",
    "keyboard",
    "monitor arm",
    "tea kettle",
    "bike light",
    "umbrella",
    "headphones",
    "power bank",
    "wall clock",
    "plant pot",
    "chess set",
    "travel mug",
]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]

TEMPLATES = [
    "Hi, this is {name}. Please send {qty} x {item} by {date}.",
    "Order from {name}: {qty} {item_plural}, needed on {date}.",
    "{name} wants {qty} {item_plural} delivered {date}.",
    "Could you ship {qty} {item_plural} to {name} on {date}? Thanks!",
    "New request - customer: {name}; product: {item}; amount: {qty}; delivery date: {date}.",
]


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _spoken_date(d: date, style: int) -> str:
    month = MONTHS[d.month - 1]
    return [
        f"{month} {d.day}, {d.year}",
        f"{d.day} {month} {d.year}",
        f"{d.day} {month[:3]} {d.year}",
        f"the {_ordinal(d.day)} of {month} {d.year}",
        d.strftime("%d.%m.%Y"),
    ][style]


def _plural(item: str, qty: int) -> str:
    if qty == 1:
        return item
    return item + ("es" if item.endswith(("ch", "sh", "s")) else "s")


def make_order_row(rng: random.Random) -> dict:
    """One chat row: system instruction, customer message, JSON answer."""
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    item = rng.choice(ITEMS)
    qty = rng.randint(1, 12)
    when = date(2024, 1, 1) + timedelta(days=rng.randrange(3 * 365))
    qty_text = NUMBER_WORDS[qty - 1] if rng.random() < 0.3 else str(qty)
    text = rng.choice(TEMPLATES).format(
        name=name, qty=qty_text, item=item, item_plural=_plural(item, qty), date=_spoken_date(when, rng.randrange(5))
    )
    answer = json.dumps({"name": name, "item": item, "quantity": qty, "date": when.isoformat()}, separators=(",", ":"))
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": text},
            {"role": "assistant", "content": answer},
        ]
    }


def generate_orders(train_rows: int, eval_rows: int, seed: int) -> dict[str, list[dict]]:
    """Train and held-out rows; held-out customer messages never appear in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for split, n in (("train", train_rows), ("test", eval_rows)):
        while len(splits[split]) < n:
            row = make_order_row(rng)
            key = row["messages"][1]["content"]
            if key in seen:
                continue
            seen.add(key)
            splits[split].append(row)
    return splits
