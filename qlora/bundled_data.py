"""The bundled offline dataset: order messages -> one-line JSON records.

Deterministic for a given seed. Each row is a chat (`messages`): a fixed system instruction, a customer message
in one of several phrasings and date styles, and the exact JSON answer. Answers are checkable by exact match:
the keys come in a fixed order, the date is normalised to ISO 8601 and the quantity to an integer.
"""

from __future__ import annotations

import json
import random
import re
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


# ---------------------------------------------------------------------------------------------- stages after SFT


def _wrong_year(order: dict, rng: random.Random) -> dict:
    return order | {"date": f"{int(order['date'][:4]) + rng.choice([-1, 1])}{order['date'][4:]}"}


def _wrong_day(order: dict, rng: random.Random) -> dict:
    when = date.fromisoformat(order["date"]) + timedelta(days=rng.choice([-2, -1, 1, 2]))
    return order | {"date": when.isoformat()}


def _day_and_month_swapped(order: dict, rng: random.Random) -> dict:
    when = date.fromisoformat(order["date"])
    if when.day > 12 or when.day == when.month:
        return _wrong_day(order, rng)
    return order | {"date": date(when.year, when.day, when.month).isoformat()}


def _day_digits_misread(order: dict, rng: random.Random) -> dict:
    """The SFT demo model's one mistake on held-out orders (5 of 50, all with the day before the month: "1 September
    2025", "2 Jan 2026", "31 Mar 2026"): a one-digit day written with its digit twice (01 -> 11, 02 -> 22), a
    two-digit day as 0 and its first digit (31 -> 03). The result need not be a real date: it is what was written."""
    year, month, day = order["date"].split("-")
    wrong = day[1] * 2 if day[0] == "0" else "0" + day[0]
    return order | {"date": f"{year}-{month}-{wrong}"}


def _wrong_quantity(order: dict, rng: random.Random) -> dict:
    changes = [1, 2] if order["quantity"] == 1 else [-1, 1, 2]
    return order | {"quantity": order["quantity"] + rng.choice(changes)}


def _missing_field(order: dict, rng: random.Random) -> dict:
    dropped = rng.choice(["quantity", "date", "item"])
    return {k: v for k, v in order.items() if k != dropped}


# The mistakes of SFT models on these orders: the day's digits misread (the one mistake the demo's SFT champion makes
# on held-out orders, measured 2026-12-02, and only where the day comes before the month), dates off by a day, a month
# or a year, a wrong or missing quantity, text around the JSON.
ORDER_MISTAKES = {
    "day_digits_misread": _day_digits_misread,
    "wrong_year": _wrong_year,
    "wrong_day": _wrong_day,
    "day_and_month_swapped": _day_and_month_swapped,
    "wrong_quantity": _wrong_quantity,
    "missing_field": _missing_field,
    "text_around": None,  # the answer itself, wrapped in words
}
# "1 September 2025", "2 Jan 2026": a message with the day before the month (_spoken_date's styles 1 and 2)
DAY_BEFORE_MONTH = re.compile(r"\b\d{1,2} (?:" + "|".join(m[:3] for m in MONTHS) + r")[a-z]* \d{4}\b")


def order_mistake(answer: str, rng: random.Random, message: str = "") -> str:
    """A wrong answer to the order in `message`: where its day comes before the month, the demo SFT model's own
    mistake (the day's digits misread), so that a preference stage trains on what the model gets wrong; otherwise
    one of ORDER_MISTAKES' other kinds, at random."""
    kind = "day_digits_misread" if DAY_BEFORE_MONTH.search(message) else rng.choice(list(ORDER_MISTAKES)[1:])
    if kind == "text_around":
        return rng.choice(["Here is the order: {}", "{}\nLet me know if anything else is needed.", "Sure! {}"]).format(
            answer
        )
    wrong = ORDER_MISTAKES[kind](json.loads(answer), rng)
    return json.dumps(wrong, separators=(",", ":"))


def generate_order_stage_rows(kind: str, train_rows: int, eval_rows: int, seed: int) -> dict[str, list[dict]]:
    """The orders of `generate_orders(train_rows, eval_rows, seed)` (the same held-out orders SFT is measured on) in
    a stage's format: `preference` (the correct JSON chosen, a typical mistake rejected), `unpaired_preference` (half
    the rows correct and desirable, half a mistake and undesirable) or `prompt_only` (the expected JSON as `answer`,
    for GRPO's rewards). Prompts are the chat turns before the answer."""
    rng = random.Random(seed + 1)
    out: dict[str, list[dict]] = {}
    for split, rows in generate_orders(train_rows, eval_rows, seed).items():
        out[split] = []
        for row in rows:
            prompt, answer = row["messages"][:-1], row["messages"][-1]["content"]
            if kind == "preference":
                out[split].append(
                    {"prompt": prompt, "chosen": answer, "rejected": order_mistake(answer, rng, prompt[-1]["content"])}
                )
            elif kind == "unpaired_preference":
                good = rng.random() < 0.5
                completion = answer if good else order_mistake(answer, rng, prompt[-1]["content"])
                out[split].append({"prompt": prompt, "completion": completion, "label": good})
            elif kind == "prompt_only":
                out[split].append({"prompt": prompt, "answer": answer})
            else:
                raise ValueError(f"no stage format {kind!r}")
    return out
