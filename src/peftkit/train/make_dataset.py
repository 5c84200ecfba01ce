"""Generate the bundled dataset: extract the one date in a sentence and write it as YYYY-MM-DD.

Run ``python -m peftkit.train.make_dataset`` to regenerate ``src/peftkit/data/dates_{train,eval}.jsonl``;
a fixed seed makes the output byte-identical. Each row is Alpaca-form (instruction / input / output).
The answer is short and unique, so held-out exact match is a clean metric, and the skill (month names,
ordinal days, US numeric order, distracting numbers) is one the base SmolLM2-135M gets wrong.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

INSTRUCTION = "Extract the date from the sentence and write it as YYYY-MM-DD. Numeric dates like 03/05/2021 are month/day/year."
MONTHS = [dt.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
SEED = 1234
N_TRAIN, N_EVAL = 1200, 240

PEOPLE = [
    "Maria",
    "Tom",
    "Dr. Okafor",
    "our landlord",
    "the committee",
    "Grandma",
    "Priya",
    "the mayor",
    "Lukas",
    "my sister",
]
EVENTS = [
    "{p} signed the lease on {d}.",
    "The concert was moved to {d} because of the storm.",
    "{p} was born on {d} at 4:30 in the morning.",
    "Please submit all 3 forms before {d}.",
    "On {d}, {p} paid $240 for the repairs.",
    "The shop reopened on {d} after 18 months of renovation.",
    "Our flight 772 departs on {d}.",
    "{p} retired on {d} after 35 years at the factory.",
    "The contract, signed {d}, covers 12 buildings.",
    "Invoice #4821 is due {d}.",
    "We adopted the dog on {d}; she was 2 years old.",
    "{p} finished the marathon on {d} in 3 hours 41 minutes.",
    "The bridge first opened to traffic on {d}.",
    "According to the letter dated {d}, {p} owes 15 euros.",
    "The meeting on {d} lasted 90 minutes.",
    "{p} moved into apartment 5B on {d}.",
    "Registration closes at midnight on {d}.",
    "The experiment started on {d} with 64 samples.",
    "{d} is when {p} planted the 20 apple trees.",
    "I last saw {p} on {d}, near gate 9.",
]


def ordinal(n: int) -> str:
    """1 -> '1st', 12 -> '12th', 22 -> '22nd'."""
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def render_date(d: dt.date, rng: random.Random) -> str:
    """Write ``d`` in one of many surface forms a person would use."""
    month, short = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    forms = [
        f"{month} {d.day}, {d.year}",
        f"{month} {ordinal(d.day)}, {d.year}",
        f"{d.day} {month} {d.year}",
        f"the {ordinal(d.day)} of {month} {d.year}",
        f"{short}. {d.day}, {d.year}",
        f"{d.day} {short} {d.year}",
        f"{d.month:02d}/{d.day:02d}/{d.year}",
        f"{d.month}/{d.day}/{d.year}",
        f"{d.strftime('%A')}, {month} {d.day}, {d.year}",
        f"{month} {ordinal(d.day)} {d.year}",
    ]
    return rng.choice(forms)


def make_row(rng: random.Random) -> dict[str, str]:
    """One Alpaca row with a random date (1950-2035) in a random sentence."""
    start = dt.date(1950, 1, 1).toordinal()
    d = dt.date.fromordinal(rng.randrange(start, dt.date(2035, 12, 31).toordinal()))
    sentence = rng.choice(EVENTS).format(p=rng.choice(PEOPLE), d=render_date(d, rng))
    return {"instruction": INSTRUCTION, "input": sentence[0].upper() + sentence[1:], "output": d.isoformat()}


def generate(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows; no held-out input also appears in train."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < N_TRAIN + N_EVAL:
        row = make_row(rng)
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
    return rows[:N_TRAIN], rows[N_TRAIN:]


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write one JSON object per line."""
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "data"
    out.mkdir(exist_ok=True)
    train, held_out = generate()
    write_jsonl(train, out / "dates_train.jsonl")
    write_jsonl(held_out, out / "dates_eval.jsonl")
    print(f"wrote {len(train)} train and {len(held_out)} held-out rows to {out}")


if __name__ == "__main__":
    main()
